"""The bottom room: helpers with no dependencies that every other room may import."""

"""The tiny config trained on a mix of the corpus and synthetic retrieval tasks.

For the length-generalisation grid: a small model that can actually retrieve (passkey, kv,
line; train/retrieval.py) at its training length l_max = 256, evaluated at 128 .. 1024 to
show what happens beyond it. Nine in ten training documents are synthetic samples of 128 to
256 tokens; corpus documents are much longer (stdlib files, ~18k bytes on average), so the
samples are still only ~9% of the training tokens and the corpus perplexity stays
meaningful. (With 0.5 they would be ~1% of the tokens: about a hundred samples in tiny's
600 steps, too few to learn retrieval.) Sample lengths start at 128, not l_max // 4 = 64:
with bytes a sample needs at least 104 tokens (needle + question + answer).
train.steps is tiny's; raise it for a model that retrieves reliably.
"""
from configs import tiny


def get_config():
    config = tiny.get_config()
    config.data.retrieval_fraction = 0.9
    config.data.retrieval_tasks = ("passkey", "kv", "line")
    config.data.retrieval_min_length = 128
    config.data.retrieval_max_length = 0    # the training seq_len (l_max = 256)
    config.eval.lengths = (128, 256, 512, 1024)
    config.eval.retrieval_tasks = ("passkey", "kv", "line")   # score the retrieval grid
    return config

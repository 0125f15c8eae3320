"""The tiny model trained on a mix of the corpus and synthetic retrieval tasks.

For the depth x length grid: a small model that can actually retrieve (passkey, kv, line;
train/retrieval.py) at its training length l_max = 256, evaluated at 128 .. 1024 to show
what happens beyond it. 98 in 100 training documents are synthetic samples of 128 to 256
tokens; corpus documents are far longer (stdlib files, ~18k bytes on average), so the
samples are still only about a third of the training tokens and the corpus perplexity stays
meaningful. Sample lengths start at 128, not l_max // 4 = 64: with bytes a sample needs at
least 104 tokens (needle + question + answer). Retrieval is learned late (an induction
behaviour), so this runs more, smaller steps than configs/tiny.py.
"""
from configs import tiny


def get_config():
    config = tiny.get_config()
    config.data.retrieval_fraction = 0.98
    config.data.retrieval_tasks = ("passkey", "kv", "line")
    config.data.retrieval_min_length = 128
    config.data.retrieval_max_length = 0    # the training seq_len (l_max = 256)
    config.train.steps = 4000
    config.train.batch_size = 8
    config.train.log_every_steps = 50
    config.checkpoint.every_steps = 400
    config.eval.lengths = (128, 256, 512, 1024)
    config.eval.max_batches = 4
    config.eval.sliding_max_windows = 16
    config.eval.retrieval_tasks = ("passkey", "kv", "line")   # score the retrieval grid
    config.eval.retrieval_samples = 2
    return config

"""RULER (Hsieh et al. 2024, "RULER: What's the Real Context Size of Your Long-Context Language
Models?", NVIDIA/RULER scripts/data/synthetic) by length, written for this project.

Pure Python/numpy. The 11 synthetic tasks that need no download follow RULER's templates,
needle/haystack kinds, counts and answer budgets (`tokens_to_generate`):

  niah_single_1   noise haystack, word key, 7-digit number value
  niah_single_2   essay haystack, word key, number value
  niah_single_3   essay haystack, word key, uuid value
  niah_multikey_1 essay haystack, 4 word keys (1 queried), number values
  niah_multikey_2 needle haystack (every line a needle), word keys, number values
  niah_multikey_3 needle haystack, uuid keys and values
  niah_multivalue essay haystack, 1 key with 4 number values
  niah_multiquery essay haystack, 4 keys, all 4 queried
  vt              variable tracking: 1 chain of 4 hops in noise, with one in-context example
  cwe             common words extraction: 10 common words (30x, rarer words 3x; 6x/1x below
                  4096), one in-context example
  fwe             frequent words extraction: coded 6-letter words drawn zeta(alpha = 2),
                  vocabulary length // 50, answer the ranks 1-3 (rank 0 is "...", noise)

Differences from RULER, on purpose:
  - essay haystack: the caller passes the text (the run's own validation documents) instead of
    Paul Graham's essays; sentences are split on ". ", "! ", "? " instead of nltk;
  - word keys are adjective-noun pairs from the short lists below (RULER: wonderwords' lists);
    cwe draws words from these lists too and, past their size, from made-up syllable words
    (RULER: a list of real English words);
  - each sample's prompt ends with RULER's answer prefix (the model continues it), and its
    length is measured with the run's tokenizer (`count_tokens`): between 75% and 100% of
    `length - max_new_tokens`, where max_new_tokens is RULER's tokens_to_generate.

qa_1 (SQuAD) and qa_2 (HotpotQA) need a local file (`qa_path`, RULER's JSON: SQuAD v2 dev
or HotpotQA dev); without one they are skipped with the reason.
"""
from __future__ import annotations

import functools
import json
import random
import re
import string
import uuid
import zlib
from typing import Callable, Sequence

SYNTHETIC_TASKS = ("niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1",
                   "niah_multikey_2", "niah_multikey_3", "niah_multivalue", "niah_multiquery",
                   "vt", "cwe", "fwe")
QA_TASKS = ("qa_1", "qa_2")
ALL_TASKS = SYNTHETIC_TASKS + QA_TASKS
DEFAULT_THRESHOLD = 85.6          # Llama-2-7B's RULER mean at 4K, the paper's threshold
FILL_LOW = 0.75                   # a prompt fills at least this fraction of its budget

# RULER's per-task settings (scripts/synthetic.yaml).
NIAH = {
    "niah_single_1": dict(haystack="noise", key="words", value="numbers", k=1, v=1, q=1),
    "niah_single_2": dict(haystack="essay", key="words", value="numbers", k=1, v=1, q=1),
    "niah_single_3": dict(haystack="essay", key="words", value="uuids", k=1, v=1, q=1),
    "niah_multikey_1": dict(haystack="essay", key="words", value="numbers", k=4, v=1, q=1),
    "niah_multikey_2": dict(haystack="needle", key="words", value="numbers", k=1, v=1, q=1),
    "niah_multikey_3": dict(haystack="needle", key="uuids", value="uuids", k=1, v=1, q=1),
    "niah_multivalue": dict(haystack="essay", key="words", value="numbers", k=1, v=4, q=1),
    "niah_multiquery": dict(haystack="essay", key="words", value="numbers", k=1, v=1, q=4),
}
VT_CHAINS, VT_HOPS = 1, 4
CWE_FREQ, CWE_UNCOMMON_FREQ, CWE_COMMON = 30, 3, 10
FWE_ALPHA, FWE_WORD_LENGTH = 2.0, 6

# RULER's tokens_to_generate (scripts/data/synthetic/constants.py).
TOKENS_TO_GENERATE = {"niah": 128, "vt": 30, "cwe": 120, "fwe": 50, "qa": 32}

TEMPLATES = {
    "niah": ("Some special magic {type_needle_v} are hidden within the following text. Make "
             "sure to memorize it. I will quiz you about the {type_needle_v} afterwards.\n"
             "{context}\nWhat are all the special magic {type_needle_v} for {query} mentioned "
             "in the provided text?"
             " The special magic {type_needle_v} for {query} mentioned in the provided text "
             "are"),
    "vt": ("Memorize and track the chain(s) of variable assignment hidden in the following "
           "text.\n\n{context}\nQuestion: Find all variables that are assigned the value "
           "{query} in the text above."
           " Answer: According to the chain(s) of variable assignment in the text above, "
           "{num_v} variables are assigned the value {query}, they are: "),
    "cwe": ("Below is a numbered list of words. In these words, some appear more often than "
            "others. Memorize the ones that appear most often.\n{context}\nQuestion: What are "
            "the 10 most common words in the above list?"
            " Answer: The top 10 words that appear most often in the list are:"),
    "fwe": ("Read the following coded text and track the frequency of each coded word. Find "
            "the three most frequently appeared coded words. {context}\nQuestion: Do not "
            "provide any explanation. Please ignore the dots '....'. What are the three most "
            "frequently appeared words in the above coded text?"
            " Answer: According to the coded text above, the three most frequently appeared "
            "words are:"),
    "qa": ("Answer the question based on the given documents. Only give me the answer and do "
           "not output any other words.\n\nThe following are given documents.\n\n{context}\n\n"
           "Answer the question based on the given documents. Only give me the answer and do "
           "not output any other words.\n\nQuestion: {query}"
           " Answer:"),
}
NOISE = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back "
         "again.")
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
DEPTHS = [int(round(d)) for d in [100 * i / 39 for i in range(40)]]

ADJECTIVES = """able acid angry brave bright broad calm cheap clean clever cold cool curly
damp dark deep dense dizzy dry dusty eager early easy empty equal fair fancy fast fierce
flat fluffy fresh friendly funny gentle giant glad golden grand green happy heavy hollow
honest huge humble icy jolly kind large lazy light little lively lonely loud lucky mad
mellow merry mighty modern narrow neat noisy odd old orange plain polite proud purple
quick quiet rapid rare red rich rough round royal rusty sad safe salty sharp shiny short
silent silly simple slow small smooth soft solid sour spicy steady steep sticky strange
strong sweet swift tall tame tender thick thin tidy tiny tough vast warm weak wet white
wide wild wise witty young zany""".split()
NOUNS = """acorn anchor apple arrow badge bakery banjo barn basket beacon bell bicycle
blanket boat bottle bridge brook bucket cabin camera candle canoe canyon carpet castle
cellar chair cherry chimney circus cliff clock cloud comet compass cookie copper cottage
crayon crown cup curtain daisy desert diamond dragon drum eagle engine falcon feather
fence fiddle forest fountain garden garlic ginger glacier guitar hammer harbor helmet
honey island jacket jungle kettle kitten ladder lagoon lantern lemon lizard magnet
mango maple meadow mirror mountain needle nest ocean orchard otter oyster paddle palace
panda parrot pebble pepper piano pillow planet pocket pond puzzle quilt rabbit radio
raven ribbon river robot rocket saddle sailor salmon sandal scarf shadow shell signal
silver spider spoon squirrel statue stone storm sunset tablet teapot temple thunder
tiger tower tractor trumpet tulip tunnel turtle umbrella valley velvet violin volcano
wagon walnut whistle willow window wizard zebra""".split()
VERBS = """bake build carry climb dance dig draw drink drive eat fly fold grow hide jump
kick knit laugh lift listen paint plant play pour pull push read ride run sail sew
sing skate sleep smile speak spin swim throw walk wash wave whisper write""".split()
KEY_WORDS = sorted({f"{a}-{n}" for a in ADJECTIVES for n in NOUNS})
PLAIN_WORDS = sorted(set(ADJECTIVES + NOUNS + VERBS))


class RulerTooShort(ValueError):
    """The task's prompt cannot fit the length (with the answer budget) at all."""


# ---------------------------------------------------------------------------- random parts

def _number(rng: random.Random, digits: int = 7) -> str:
    return str(rng.randint(10 ** (digits - 1), 10 ** digits - 1))


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _random(kind: str, rng: random.Random) -> str:
    if kind == "numbers":
        return _number(rng)
    if kind == "words":
        return rng.choice(KEY_WORDS)
    if kind == "uuids":
        return _uuid(rng)
    raise ValueError(f"unknown needle kind {kind!r}")


def _syllable_word(index: int) -> str:
    """A made-up pronounceable word, distinct for each index."""
    consonants, vowels = "bdfgklmnprstvz", "aeiou"
    parts = []
    index += 1
    while index:
        index, r = divmod(index, len(consonants) * len(vowels))
        parts.append(consonants[r // len(vowels)] + vowels[r % len(vowels)])
    return "".join(parts) + "x"


def _word_pool(count: int) -> list[str]:
    pool = list(PLAIN_WORDS)
    i = 0
    while len(pool) < count:
        pool.append(_syllable_word(i))
        i += 1
    return pool


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]


# ------------------------------------------------------------------------------- generators

def _niah(task: str, n: int, rng: random.Random, haystack_words: Sequence[str] | None):
    spec = NIAH[task]
    type_v = spec["value"]
    num_k = max(spec["k"], spec["q"])
    keys, values, needles = [], [], []
    for _ in range(num_k):
        keys.append(_random(spec["key"], rng))
        vals = []
        for _ in range(spec["v"]):
            vals.append(_random(type_v, rng))
            needles.append(NEEDLE.format(type_needle_v=type_v, key=keys[-1], value=vals[-1]))
        values.append(vals)
    rng.shuffle(needles)
    if spec["haystack"] == "essay":
        words = list(haystack_words)
        repeats = -(-n // len(words))
        sents = _sentences(" ".join((words * repeats)[:n]))
        cuts = [0] + sorted(int(len(sents) * d / 100) for d in rng.sample(DEPTHS, len(needles)))
        cuts.append(len(sents))
        parts = []
        for i in range(1, len(cuts)):
            parts.append(" ".join(sents[cuts[i - 1]:cuts[i]]))
            if i - 1 < len(needles):
                parts.append(needles[i - 1])
        context = " ".join(p for p in parts if p)
    else:
        if spec["haystack"] == "noise":
            lines = [NOISE] * n
        else:
            lines = [NEEDLE.format(type_needle_v=type_v, key=_random(spec["key"], rng),
                                   value=_random(type_v, rng)) for _ in range(n)]
        for index, needle in zip(sorted(rng.sample(range(n), len(needles)), reverse=True),
                                 needles):
            lines.insert(index, needle)
        context = "\n".join(lines)
    picked = rng.sample(range(num_k), spec["q"])
    queries = [keys[i] for i in picked]
    answers = [a for i in picked for a in values[i]]
    query = (", ".join(queries[:-1]) + ", and " + queries[-1]) if len(queries) > 1 \
        else queries[0]
    template = TEMPLATES["niah"]
    if spec["q"] * spec["v"] == 1:                 # RULER's singular wording
        template = (template.replace("Some", "A").replace("are all", "is")
                    .replace("are", "is").replace("answers", "answer"))
        type_v = type_v[:-1]
    return template.format(type_needle_v=type_v, context=context, query=query), answers, \
        dict(keys=keys, values=values, queries=queries, needles=len(needles))


def _vt_chain(rng: random.Random, letters: int, value: str):
    names = []
    while len(names) < VT_CHAINS * (VT_HOPS + 1):
        name = "".join(rng.choices(string.ascii_uppercase, k=letters))
        if name not in names:
            names.append(name)
    chains = []
    for c in range(VT_CHAINS):
        vs = names[c * (VT_HOPS + 1):(c + 1) * (VT_HOPS + 1)]
        chain = [f"VAR {vs[0]} = {value if c == 0 else _number(rng, 5)}"]
        chain += [f"VAR {vs[j + 1]} = VAR {vs[j]} " for j in range(VT_HOPS)]
        chains.append((vs, chain))
    return chains


def _vt_text(n: int, rng: random.Random, letters: int, value: str):
    chains = _vt_chain(rng, letters, value)
    lines = [NOISE] * n
    for _, chain in chains:
        positions = sorted(rng.sample(range(len(lines)), len(chain)))
        for j, (pos, item) in enumerate(zip(positions, chain)):
            lines.insert(pos + j, item)
    context = "\n".join(lines).replace(". \n", ".\n")
    prompt = TEMPLATES["vt"].format(context=context, query=value, num_v=VT_HOPS + 1)
    return prompt, chains[0][0], chains


def _vt(n: int, rng: random.Random, example: str):
    prompt, answers, chains = _vt_text(n, rng, 5, _number(rng, 5))
    return example + "\n" + prompt, answers, dict(chains=[c for _, c in chains])


def _cwe_example(count: int, common: int, freq: int, rare_freq: int, rng: random.Random):
    pool = _word_pool(count)
    chosen = rng.sample(pool, count)
    top, rest = chosen[:common], chosen[common:]
    words = top * freq + rest * rare_freq
    rng.shuffle(words)
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(words)), top


def _cwe(n: int, rng: random.Random, length: int):
    if length < 4096:                              # RULER's settings below 4096
        shot = _cwe_example(20, CWE_COMMON, 3, 1, rng)
        context, answers = _cwe_example(max(n, CWE_COMMON), CWE_COMMON, 6, 1, rng)
    else:
        shot = _cwe_example(40, CWE_COMMON, 10, 3, rng)
        context, answers = _cwe_example(max(n, CWE_COMMON), CWE_COMMON, CWE_FREQ,
                                        CWE_UNCOMMON_FREQ, rng)
    example = TEMPLATES["cwe"].format(context=shot[0]) + " " + \
        " ".join(f"{i + 1}. {w}" for i, w in enumerate(shot[1]))
    return example + "\n" + TEMPLATES["cwe"].format(context=context), answers, \
        dict(words=max(n, CWE_COMMON))


def _fwe_vocab(rng: random.Random, size: int) -> list[str]:
    vocab = set()
    while len(vocab) < size:
        vocab.add("".join(rng.choices(string.ascii_lowercase, k=FWE_WORD_LENGTH)))
    vocab = sorted(vocab)
    rng.shuffle(vocab)
    vocab[0] = "..."                               # the top rank is noise
    return vocab


def _fwe(n: int, rng: random.Random, vocab: list[str]):
    zeta = sum(k ** -FWE_ALPHA for k in range(1, 100000)) + 1 / (1e5 * (FWE_ALPHA - 1))
    counts = [int(n * k ** -FWE_ALPHA / zeta) for k in range(1, len(vocab) + 1)]
    words = [w for w, c in zip(vocab, counts) for _ in range(c)]
    rng.shuffle(words)
    return TEMPLATES["fwe"].format(context=" ".join(words)), vocab[1:4], \
        dict(counts=dict(zip(vocab, counts)))


@functools.lru_cache(maxsize=4)
def _qa_items(path: str, task: str) -> list[dict]:
    """[{all_docs, items: [{question, answers, docs}]}] from SQuAD (qa_1: v2 dev JSON) or
    HotpotQA (qa_2: dev JSON, a list of {question, answer, context: [[title, sentences]]})."""
    with open(path) as f:
        data = json.load(f)
    items = []
    if task == "qa_1":
        docs = sorted({p["context"] for d in data["data"] for p in d["paragraphs"]})
        where = {doc: i for i, doc in enumerate(docs)}
        for d in data["data"]:
            for p in d["paragraphs"]:
                for qa in p["qas"]:
                    if not qa.get("is_impossible") and qa["answers"]:
                        items.append(dict(question=qa["question"],
                                          answers=[a["text"] for a in qa["answers"]],
                                          docs=[where[p["context"]]]))
        return [dict(all_docs=docs, items=items)]
    docs = sorted({f"{t}\n{''.join(s)}" for d in data for t, s in d["context"]})
    index = {d: i for i, d in enumerate(docs)}
    for d in data:
        items.append(dict(question=d["question"], answers=[d["answer"]],
                          docs=[index[f"{t}\n{''.join(s)}"] for t, s in d["context"]]))
    return [dict(all_docs=docs, items=items)]


def _qa(n: int, rng: random.Random, qa):
    item = qa["item"]
    others = [i for i in qa["order"] if i not in item["docs"]]
    chosen = list(item["docs"]) + others[:max(0, n - len(item["docs"]))]
    rng.shuffle(chosen)
    context = "\n\n".join(f"Document {i + 1}:\n{qa['all_docs'][d]}"
                          for i, d in enumerate(chosen))
    return TEMPLATES["qa"].format(context=context, query=item["question"]), \
        list(item["answers"]), dict(documents=len(chosen))


# ---------------------------------------------------------------------------------- filling

def task_kind(task: str) -> str:
    if task.startswith("niah"):
        return "niah"
    if task.startswith("qa"):
        return "qa"
    return task


def answer_budget(task: str) -> int:
    return TOKENS_TO_GENERATE[task_kind(task)]


def sample_seed(seed: int, task: str, length: int, index: int) -> int:
    return zlib.crc32(f"{seed}/{task}/{length}/{index}".encode())


def _fill(make: Callable[[int], tuple], count_tokens, budget: int, smallest: int,
          task: str, length: int):
    """The largest haystack size n >= smallest whose prompt fits `budget` tokens; RULER's
    binary search. make(n) must be deterministic in n."""
    first = make(smallest)
    if count_tokens(first[0]) > budget:
        raise RulerTooShort(f"{task} does not fit length {length}: its smallest prompt has "
                            f"{count_tokens(first[0])} tokens, the budget "
                            f"{budget} (length - {length - budget} answer tokens)")
    low, high = smallest, smallest * 2
    while count_tokens(make(high)[0]) <= budget:   # grow until it overflows
        low, high = high, high * 2
    while high - low > 1:
        mid = (low + high) // 2
        if count_tokens(make(mid)[0]) <= budget:
            low = mid
        else:
            high = mid
    return make(low), low


def make_sample(task: str, length: int, *, seed: int, index: int = 0,
                count_tokens: Callable[[str], int], haystack: str | None = None,
                qa_path: str | None = None) -> dict:
    """One RULER sample of `task` at `length` tokens: dict(task, length, prompt, answers,
    tokens, max_new_tokens). Raises RulerTooShort when the task cannot fit the length and
    ValueError when the task needs a haystack text / qa file that is not given."""
    if task not in ALL_TASKS:
        raise ValueError(f"unknown RULER task {task!r}; known: {', '.join(ALL_TASKS)}")
    budget_new = answer_budget(task)
    budget = length - budget_new
    if budget <= 0:
        raise RulerTooShort(f"{task} does not fit length {length}: the answer budget alone "
                            f"is {budget_new} tokens")
    base = sample_seed(seed, task, length, index)

    def fresh():
        return random.Random(base)

    if task in NIAH:
        words = None
        if NIAH[task]["haystack"] == "essay":
            if not haystack or not haystack.split():
                raise ValueError(f"{task} needs an essay haystack text")
            words = re.sub(r"\s+", " ", haystack).strip().split(" ")
        needles = max(NIAH[task]["k"], NIAH[task]["q"]) * NIAH[task]["v"]
        smallest = needles if NIAH[task]["haystack"] != "essay" else 1

        def make(n):
            return _niah(task, n, fresh(), words)
    elif task == "vt":
        rng = fresh()
        shot_seed = rng.getrandbits(32)

        def shot_make(n):
            prompt, answers, _ = _vt_text(n, random.Random(shot_seed), 3,
                                          _number(random.Random(shot_seed + 1), 5))
            return prompt + " " + " ".join(answers), answers, {}

        # RULER's in-context example fills 500 tokens (no answer budget), at least 1 line.
        try:
            (shot, _, _), _ = _fill(shot_make, count_tokens, 500, VT_HOPS + 1, task, 500)
        except RulerTooShort:
            shot = shot_make(VT_HOPS + 1)[0]

        def make(n):
            return _vt(n, fresh(), shot)
        smallest = VT_CHAINS * (VT_HOPS + 1)
    elif task == "cwe":
        def make(n):
            return _cwe(n, fresh(), length)
        smallest = CWE_COMMON + 1
    elif task == "fwe":
        vocab = _fwe_vocab(fresh(), max(budget // 50, 5))

        def make(n):
            return _fwe(n, fresh(), vocab)
        smallest = 8
    else:
        if not qa_path:
            raise ValueError(f"{task} needs eval.ruler.qa_path")
        data = _qa_items(qa_path, task)[0]
        rng = fresh()
        item = rng.choice(data["items"])
        order = list(range(len(data["all_docs"])))
        rng.shuffle(order)
        qa = dict(item=item, order=order, all_docs=data["all_docs"])

        def make(n):
            return _qa(n, fresh(), qa)
        smallest = len(item["docs"])

    (prompt, answers, info), n = _fill(make, count_tokens, budget, smallest, task, length)
    tokens = count_tokens(prompt)
    if tokens < FILL_LOW * budget:
        raise RulerTooShort(f"{task} at length {length}: the prompt fills only {tokens} of "
                            f"{budget} tokens (haystack units are too coarse)")
    return dict(task=task, length=int(length), prompt=prompt, answers=list(answers),
                tokens=int(tokens), max_new_tokens=int(budget_new), haystack_size=int(n),
                info=info)


def resolve_tasks(tasks: Sequence[str], qa_path: str | None) -> tuple[list[str], dict]:
    """(tasks to run, {task: reason skipped}) for eval.ruler.tasks."""
    names = list(tasks)
    if "all" in names:
        names = [t for t in names if t != "all"]
        names = list(dict.fromkeys(list(ALL_TASKS) + names))
    skipped = {}
    run = []
    for t in names:
        if t not in ALL_TASKS:
            raise ValueError(f"unknown RULER task {t!r}; known: {', '.join(ALL_TASKS)}, all")
        if t in QA_TASKS and not qa_path:
            skipped[t] = ("needs a local SQuAD (qa_1) / HotpotQA (qa_2) JSON file "
                          "(eval.ruler.qa_path); none given")
        else:
            run.append(t)
    return run, skipped


def make_samples(tasks: Sequence[str], lengths: Sequence[int], samples: int, *, seed: int,
                 count_tokens, haystack: str | None = None,
                 qa_path: str | None = None) -> tuple[list[dict], dict]:
    """All samples, and {"task@length" or task: reason} for what could not be built."""
    out, skipped = [], {}
    for task in tasks:
        for length in lengths:
            for i in range(samples):
                try:
                    out.append(make_sample(task, length, seed=seed, index=i,
                                           count_tokens=count_tokens, haystack=haystack,
                                           qa_path=qa_path))
                except RulerTooShort as error:
                    skipped[f"{task}@{length}"] = str(error)
                    break
                except ValueError as error:
                    skipped[task] = str(error)
                    break
            if task in skipped:
                break
    return out, skipped


# ---------------------------------------------------------------------------------- scoring

def string_match_all(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """RULER's string_match_all: mean over samples of the fraction of references found in the
    prediction (case-insensitive), x100."""
    scores = [sum(r.lower() in p.lower() for r in refs) / len(refs)
              for p, refs in zip(predictions, references)]
    return round(100 * sum(scores) / len(scores), 2)


def string_match_part(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """RULER's string_match_part: 1 if any reference is in the prediction, mean x100."""
    scores = [max(float(r.lower() in p.lower()) for r in refs)
              for p, refs in zip(predictions, references)]
    return round(100 * sum(scores) / len(scores), 2)


def metric(task: str):
    return string_match_part if task_kind(task) == "qa" else string_match_all


def score_sample(task: str, prediction: str, answers: Sequence[str]) -> float:
    return metric(task)([prediction], [answers])


def effective_length(mean_by_length: dict, threshold: float = DEFAULT_THRESHOLD):
    """The longest length L whose mean score is > threshold at L and at every shorter length
    (RULER: the largest length up to which the model stays above the threshold, Llama-2-7B's
    85.6 at 4K); None if the shortest length fails. Lengths without a score (None) end the
    run of passing lengths."""
    best = None
    for length in sorted(int(k) for k in mean_by_length):
        value = mean_by_length.get(length, mean_by_length.get(str(length)))
        if value is None or not value > threshold:
            break
        best = length
    return best


def summarise(records: Sequence[dict], lengths: Sequence[int], tasks: Sequence[str],
              skipped: dict, threshold: float = DEFAULT_THRESHOLD) -> dict:
    """ruler.json from scored records (task, length, answers, prediction)."""
    table = {}
    for task in tasks:
        row = {}
        for length in lengths:
            cell = [r for r in records if r["task"] == task and r["length"] == length]
            row[str(length)] = metric(task)([r["prediction"] for r in cell],
                                            [r["answers"] for r in cell]) if cell else None
        table[task] = row
    mean = {}
    for length in lengths:
        values = [table[t][str(length)] for t in tasks if table[t][str(length)] is not None]
        complete = len(values) == len(tasks) and values
        mean[str(length)] = round(sum(values) / len(values), 2) if complete else None
    return {"tasks": table, "mean": mean,
            "effective_length": effective_length(mean, threshold),
            "threshold": threshold, "skipped": dict(skipped)}

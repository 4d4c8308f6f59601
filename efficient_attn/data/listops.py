"""Long Range Arena ListOps, generated locally and seeded.

ListOps (Nangia & Bowman 2018), as used in LRA (Tay et al. 2020): a nested
prefix expression over the digits 0..9 and four list operators, e.g.

    [MAX 2 9 [MIN 4 7 ] 0 ]   ->  9

  MIN, MAX  minimum / maximum of the arguments
  MED       median, truncated to an integer like LRA's `int(np.median(args))`:
            an even count averages the two middle values and rounds down,
            [MED 1 2 ] -> 1, [MED 3 8 1 6 ] -> 4
  SM        sum modulo 10

The label is the value of the whole expression (10 classes, far from
balanced). The task tests whether a model can follow hierarchical structure
over sequences of 500-2000 tokens.

Sampling follows LRA's generator (lra_benchmarks/data/listops.py): the root sits
at depth 1; a node below `max_depth` becomes an operator with probability 1/4
(else a uniform digit), an operator takes a uniform 2..`max_args` arguments and
a uniform operator, and a node at `max_depth` is always a digit. So digits
reach depth `max_depth` and operators nest at most `max_depth - 1` deep. Trees
are drawn until their token count lies in [min_length, max_length] (LRA keeps
lengths strictly inside the bounds). The root is always an operator, which is
the same distribution given any min_length >= 2. The sampler is LRA's own, not
biased toward long trees: about a third of its trees fall in 500..2000, and a
tree is abandoned as soon as it passes max_length, so rejection stays cheap.

Tokens. LRA's generator writes "( ... )" around every node of a binarised tree
and counts lengths without them; its first public tokenizer dropped every
non-alphanumeric character, brackets included, which made the task unsolvable
(LRA issues #6, #14, #20). The fixed pipeline, and the loaders that follow it,
keep "[MIN" ... "[SM" and "]" as tokens and drop the parentheses. We do the
same: one token per operator, digit and closing bracket, no parentheses, so a
sequence's length is exactly LRA's counted length. `tokenize` accepts (and
drops) "(" and ")", so LRA's TSV sources can be read too.
"""

from __future__ import annotations

from typing import Union

import numpy as np

OPERATORS = ("MIN", "MAX", "MED", "SM")
VOCAB = ["<pad>"] + [str(d) for d in range(10)] + ["[" + op for op in OPERATORS] + ["]"]
PAD_ID = 0
NUM_CLASSES = 10
_TOKEN_ID = {tok: i for i, tok in enumerate(VOCAB)}
_DIGIT0 = _TOKEN_ID["0"]
_OP0 = _TOKEN_ID["[MIN"]
_END = _TOKEN_ID["]"]
_P_OPERATOR = 0.25  # LRA's VALUE_P: a node is an operator with probability 1/4
_MIN_EXPRESSION = 4  # "[OP a b ]"
_MAX_ATTEMPTS = 200_000  # consecutive rejections before we call the window infeasible

# A tree is a digit (int) or (operator name, tuple of child trees).
Tree = Union[int, tuple]


def tokenize(text: str) -> list[int]:
  """Whitespace-separated ListOps text -> token ids (parentheses dropped)."""
  ids = []
  for tok in text.split():
    if tok in ("(", ")"):
      continue
    if tok not in _TOKEN_ID or tok == VOCAB[PAD_ID]:
      raise ValueError(f"tokenize got unknown ListOps token {tok!r}; valid tokens are {VOCAB[1:]}.")
    ids.append(_TOKEN_ID[tok])
  return ids


def detokenize(ids) -> str:
  """Token ids -> text; padding (id 0) is skipped."""
  ids = [int(i) for i in np.asarray(ids).reshape(-1)]
  bad = [i for i in ids if not 0 <= i < len(VOCAB)]
  if bad:
    raise ValueError(f"detokenize got token id {bad[0]}; valid ids are 0..{len(VOCAB) - 1}.")
  return " ".join(VOCAB[i] for i in ids if i != PAD_ID)


def _apply(op: str, args: list[int]) -> int:
  if op == "MIN":
    return min(args)
  if op == "MAX":
    return max(args)
  if op == "MED":
    s = sorted(args)
    mid = len(s) // 2
    # int(np.median(.)) in LRA: mean of the two middle values, truncated (floor for >= 0).
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) // 2
  if op == "SM":
    return sum(args) % 10
  raise ValueError(f"unknown ListOps operator {op!r}; valid operators are {OPERATORS}.")


def parse(text: str) -> Tree:
  """ListOps text -> tree (int digit, or (operator, children))."""
  stack: list[tuple[str, list]] = []
  root = None
  for tok in text.split():
    if tok in ("(", ")"):
      continue
    if root is not None:
      raise ValueError(f"ListOps text has tokens after the end of the expression: {text[:60]!r}.")
    if tok.startswith("[") and tok[1:] in OPERATORS:
      stack.append((tok[1:], []))
      continue
    if tok == "]":
      if not stack or len(stack[-1][1]) < 1:
        raise ValueError(f"ListOps text has an unmatched or empty ']': {text[:60]!r}.")
      op, children = stack.pop()
      node = (op, tuple(children))
    elif tok.isdigit() and len(tok) == 1:
      node = int(tok)
    else:
      raise ValueError(f"unknown ListOps token {tok!r}; valid tokens are {VOCAB[1:]}.")
    if stack:
      stack[-1][1].append(node)
    else:
      root = node
  if stack or root is None:
    raise ValueError(f"ListOps text is not one complete expression: {text[:60]!r}.")
  return root


def to_text(tree: Tree) -> str:
  """Tree -> ListOps text, e.g. "[MAX 2 9 [MIN 4 7 ] 0 ]"."""
  if isinstance(tree, (int, np.integer)):
    return str(int(tree))
  op, children = tree
  return " ".join([f"[{op}"] + [to_text(c) for c in children] + ["]"])


def evaluate(text_or_tree: Union[str, Tree]) -> int:
  """The value (0..9) of a ListOps expression given as text or as a tree."""
  tree = parse(text_or_tree) if isinstance(text_or_tree, str) else text_or_tree
  if isinstance(tree, (int, np.integer)):
    if not 0 <= tree <= 9:
      raise ValueError(f"ListOps digit {tree} is out of range; digits are 0..9.")
    return int(tree)
  op, children = tree
  if not children:
    raise ValueError(f"ListOps operator {op!r} has no arguments; it needs at least one.")
  return _apply(op, [evaluate(c) for c in children])


class _TooLong(Exception):
  pass


class _Uniforms:
  """U[0, 1) draws from one Generator, fetched in blocks (one NumPy call per 64k nodes)."""

  def __init__(self, rng: np.random.Generator, block: int = 1 << 16):
    self._rng, self._block = rng, block
    self._buf: list[float] = []
    self._i = 0

  def __call__(self) -> float:
    if self._i == len(self._buf):
      self._buf, self._i = self._rng.random(self._block).tolist(), 0
    self._i += 1
    return self._buf[self._i - 1]


def _sample(u: _Uniforms, depth: int, max_depth: int, max_args: int, out: list[int], limit: int,
            root: bool = False) -> int:
  """Appends one LRA-distributed subtree's ids to `out`, returns its value; aborts past `limit`."""
  if not root and (depth >= max_depth or u() >= _P_OPERATOR):
    digit = int(u() * 10)
    out.append(_DIGIT0 + digit)
    return digit
  num_args = 2 + int(u() * (max_args - 1))
  op = int(u() * len(OPERATORS))
  out.append(_OP0 + op)
  args = []
  for _ in range(num_args):
    args.append(_sample(u, depth + 1, max_depth, max_args, out, limit))
    if len(out) >= limit:  # the closing "]" would still follow
      raise _TooLong
  out.append(_END)
  return _apply(OPERATORS[op], args)


def _max_tree_length(max_depth: int, max_args: int) -> int:
  length = 1  # a digit at depth max_depth
  for _ in range(max_depth - 1):
    length = 2 + max_args * length
  return length


def _check_args(num_examples, min_length, max_length, max_depth, max_args):
  if num_examples < 0:
    raise ValueError(f"num_examples={num_examples} is negative; it must be >= 0.")
  if max_args < 2:
    raise ValueError(f"max_args={max_args} is too small; operators take 2..max_args arguments, so max_args >= 2.")
  if max_depth < 2:
    raise ValueError(f"max_depth={max_depth} is too small; an operator over digits needs max_depth >= 2.")
  if max_length < _MIN_EXPRESSION:
    raise ValueError(f"max_length={max_length} is shorter than any expression; the shortest, "
                     f"'[MIN 1 2 ]', has {_MIN_EXPRESSION} tokens.")
  if min_length > max_length:
    raise ValueError(f"min_length={min_length} exceeds max_length={max_length}; need min_length <= max_length.")
  longest = _max_tree_length(max_depth, max_args)
  if min_length > longest:
    raise ValueError(f"min_length={min_length} exceeds the longest tree of max_depth={max_depth}, "
                     f"max_args={max_args} ({longest} tokens); lower min_length or raise the limits.")


def generate_listops(num_examples: int, *, seed: int, min_length: int = 500, max_length: int = 2000,
                     max_depth: int = 10, max_args: int = 10) -> dict:
  """Samples `num_examples` ListOps expressions with LRA's tree distribution.

  Trees are rejection-sampled until their token count lies in
  [min_length, max_length] (both inclusive). Deterministic per `seed`
  (`np.random.default_rng(seed)`); a tree that passes `max_length` is abandoned
  at once, so generating 1000 examples of 500..2000 tokens takes a few seconds.
  Duplicates are not removed (LRA's set-based dedup matters only for short
  windows).

  Returns a dict of NumPy arrays:
    tokens   int32 [B, max_length], right-padded with PAD_ID = 0
    lengths  int32 [B]
    labels   int32 [B], values 0..9

  Raises ValueError for min_length > max_length, max_length < 4, max_args < 2,
  max_depth < 2, a min_length no tree can reach, or a window the sampler
  misses 200,000 times in a row (e.g. lengths unreachable with max_args=2).
  """
  _check_args(num_examples, min_length, max_length, max_depth, max_args)
  u = _Uniforms(np.random.default_rng(seed))
  tokens = np.zeros((num_examples, max_length), np.int32)
  lengths = np.zeros((num_examples,), np.int32)
  labels = np.zeros((num_examples,), np.int32)
  for b in range(num_examples):
    for _ in range(_MAX_ATTEMPTS):
      out: list[int] = []
      try:
        value = _sample(u, 1, max_depth, max_args, out, max_length, root=True)
      except _TooLong:
        continue
      if len(out) >= min_length:
        break
    else:
      raise ValueError(f"no ListOps tree with length in [{min_length}, {max_length}] after {_MAX_ATTEMPTS} "
                       f"draws (max_depth={max_depth}, max_args={max_args}); widen the length window.")
    tokens[b, :len(out)] = out
    lengths[b], labels[b] = len(out), value
  return {"tokens": tokens, "lengths": lengths, "labels": labels}

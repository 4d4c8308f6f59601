"""Sampling from and scoring a training workdir: `efficient-attn generate` and `efficient-attn eval`.

    efficient-attn generate --workdir DIR --prompt TEXT [--set sample.KEY=VALUE]...
    efficient-attn eval     --workdir DIR [--set eval.batches=N]

Both rebuild the model from the workdir's resolved config (`DIR/config.json`, written by
`train`) and restore the parameters (and buffers, e.g. the Performer's projections) of the
newest intact checkpoint under `DIR/checkpoints/` onto one device, whatever mesh trained it.
Tokens are bytes (vocab 256): the prompt is its UTF-8 encoding.

Sampling (`sample`): the prompt is read through each family's decoding state (KV cache or
recurrent state, `model.TransformerLM.decode`); a family without decoding (sparse) recomputes
the causal parallel forward over a `train.seq_len` buffer at every step. Each new token is
drawn from softmax(logits / temperature) restricted to the `top_k` most likely tokens and to
the nucleus of probability `top_p` (Holtzman et al. 2020); temperature 0 is greedy. Step i
draws with fold_in(PRNGKey(seed), i): one seed, one continuation.

Evaluation (`evaluate`): mean next-byte cross-entropy (nats) over the weighted targets of the
validation split's packed batches (the stream `train` validates on), its perplexity exp(loss)
and bits per byte = loss / ln 2 (one token is one byte).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from efficient_attn import config as config_lib, platform
from efficient_attn.config import Config, ConfigError, apply_overrides
from efficient_attn.model import TransformerLM, init_decode_states

SAMPLE_DEFAULTS: dict[str, Any] = {
    "sample.max_new_tokens": 0,    # bytes to generate after the prompt; 0 = 200, or as many as fit
    "sample.temperature": 1.0,     # 0 = greedy (argmax)
    "sample.top_k": 0,             # keep the k most likely tokens; 0 = all
    "sample.top_p": 1.0,           # keep the smallest set of tokens with this much probability; 1 = all
    "sample.seed": 0,
}
DEFAULT_NEW_TOKENS = 200  # sample.max_new_tokens=0: this many, or as many as fit in train.seq_len
EVAL_DEFAULTS: dict[str, Any] = {
    "eval.batches": 0,             # validation batches of train.batch_size x train.seq_len; 0 = the whole split
}
SETTINGS_HELP = {
    "sample.max_new_tokens": "bytes to generate after the prompt (prompt + these <= train.seq_len);"
                             " 0 = 200, or as many as fit",
    "sample.temperature": "divides the logits; 0 = greedy (argmax)",
    "sample.top_k": "sample among the k most likely tokens only; 0 = all",
    "sample.top_p": "sample within the smallest set of tokens whose probability reaches p (nucleus); 1 = all",
    "sample.seed": "one seed, one continuation",
    "eval.batches": "validation batches (train.batch_size x train.seq_len each); 0 = the whole validation split",
}


# ----------------------------------------------------------------------------- settings


def sample_settings(overrides: dict[str, Any]) -> dict[str, Any]:
  """SAMPLE_DEFAULTS updated by `overrides` ({"sample.KEY": value}); ConfigError (one sentence) on a bad one."""
  s = apply_overrides(SAMPLE_DEFAULTS, overrides, "generate")
  n, temp, k, p, seed = (s[f"sample.{key}"] for key in ("max_new_tokens", "temperature", "top_k", "top_p", "seed"))
  if n < 0:
    raise ConfigError(f"sample.max_new_tokens={n} must be >= 0 (0 = {DEFAULT_NEW_TOKENS}, or as many as fit after"
                      " the prompt).")
  if not (math.isfinite(temp) and temp >= 0):
    raise ConfigError(f"sample.temperature={temp} must be a finite number >= 0 (0 = greedy).")
  if k < 0:
    raise ConfigError(f"sample.top_k={k} must be >= 0 (0 = no top-k filtering).")
  if not 0 < p <= 1:
    raise ConfigError(f"sample.top_p={p} must be in (0, 1] (1 = no nucleus filtering).")
  if seed < 0:
    raise ConfigError(f"sample.seed={seed} must be >= 0.")
  return {key.split(".", 1)[1]: v for key, v in s.items()}


def eval_settings(overrides: dict[str, Any]) -> dict[str, Any]:
  """EVAL_DEFAULTS updated by `overrides` ({"eval.KEY": value}); ConfigError (one sentence) on a bad one."""
  s = apply_overrides(EVAL_DEFAULTS, overrides, "eval")
  if s["eval.batches"] < 0:
    raise ConfigError(f"eval.batches={s['eval.batches']} must be >= 0 (0 = the whole validation split).")
  return {key.split(".", 1)[1]: v for key, v in s.items()}


# ----------------------------------------------------------------------------- the workdir


def load_workdir_config(workdir: str) -> Config:
  """The training config a workdir keeps (`DIR/config.json`); ConfigError (one sentence) if there is none."""
  if not os.path.isdir(workdir):
    raise ConfigError(f"--workdir {workdir} is not a directory; pass the workdir of an `efficient-attn train` run.")
  path = os.path.join(workdir, config_lib.CONFIG_JSON)
  if not os.path.isfile(path):
    raise ConfigError(f"--workdir {workdir} has no {config_lib.CONFIG_JSON}; pass the workdir of an"
                      " `efficient-attn train` run (it writes its resolved config there).")
  try:
    with open(path, encoding="utf-8") as f:
      flat = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ConfigError(f"{path} is not readable JSON ({e}).") from None
  if not isinstance(flat, dict) or "model.attention" not in flat:
    raise ConfigError(f"{path} is not a training config (an experiment's?); pass a training workdir, such as an"
                      " experiment's DIR/variants/NAME.")
  return config_lib.load_config_json(path)


def _checkpoint_dir(workdir: str) -> str:
  """DIR/checkpoints if it holds a finished checkpoint, else a ConfigError (nothing is created)."""
  path = os.path.abspath(os.path.join(workdir, "checkpoints"))
  steps = [d for d in os.listdir(path) if d.isdigit()] if os.path.isdir(path) else []
  if not steps:
    raise ConfigError(f"--workdir {workdir} holds no checkpoint (nothing under {path}); train first with"
                      f" `efficient-attn train --workdir {workdir}`.")
  return path


def restore_variables(cfg: Config, workdir: str) -> tuple[TransformerLM, dict, int]:
  """(model, its variables {"params"[, "buffers"]}, step) from the newest intact checkpoint, on one device.

  Only params and buffers are read (orbax partial restore: no optimizer state), resharded onto
  this process's first device whatever mesh saved them. A checkpoint that fails to load is skipped for an
  older one (and moved aside, as `train` does: `reliability.restore_newest_intact`).
  """
  import orbax.checkpoint as ocp

  from efficient_attn import reliability

  path = _checkpoint_dir(workdir)
  model = TransformerLM(cfg.model)  # one device: no expert-parallel mesh
  dummy = jnp.zeros((1, cfg.train.seq_len), jnp.int32)  # abstract only: nothing runs
  abstract = jax.eval_shape(lambda r: nn.unbox(model.init(r, dummy)), jax.random.PRNGKey(0))
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = {k: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), v)
            for k, v in abstract.items() if k in ("params", "buffers") and v}
  args = ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                partial_restore=True)
  with ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(create=False)) as mngr:
    restored = reliability.restore_newest_intact(
        mngr, lambda step: mngr.restore(step, args=ocp.args.Composite(state=args))["state"])
  if restored is None:
    raise ConfigError(f"--workdir {workdir} holds no checkpoint under {path}; train first.")
  variables, step = restored
  return model, dict(variables), step


def encode(cfg: Config, text: str) -> np.ndarray:
  """Token ids [T] of `text`: its UTF-8 bytes (the byte-level tokenizer, vocab 256)."""
  tokenizer = getattr(cfg.data, "tokenizer", "bytes")
  if tokenizer != "bytes":
    raise ConfigError(f"data.tokenizer={tokenizer!r}: generate and eval read byte-level workdirs only for now.")
  return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)


def decode(tokens) -> str:
  """Text of byte tokens (an incomplete or invalid UTF-8 sequence becomes U+FFFD)."""
  return bytes(np.asarray(tokens, np.uint8).tolist()).decode("utf-8", errors="replace")


# ----------------------------------------------------------------------------- sampling


def filter_logits(logits_V, top_k: int = 0, top_p: float = 1.0):
  """Logits [..., V] with -inf outside the `top_k` largest and outside the nucleus of mass `top_p`.

  Nucleus (Holtzman et al. 2020): the smallest set of most likely tokens whose probability
  reaches top_p (the most likely token always stays). Ties at a threshold stay in. top_k=0
  and top_p=1 leave the logits as they are. O(V log V).
  """
  V = logits_V.shape[-1]
  if 0 < top_k < V:
    kth = jax.lax.top_k(logits_V, top_k)[0][..., -1:]
    logits_V = jnp.where(logits_V < kth, -jnp.inf, logits_V)
  if top_p < 1.0:
    sorted_V = jnp.flip(jnp.sort(logits_V, axis=-1), axis=-1)
    probs_V = jax.nn.softmax(sorted_V.astype(jnp.float32), axis=-1)
    mass_before_V = jnp.cumsum(probs_V, axis=-1) - probs_V  # probability of the strictly more likely tokens
    kept = jnp.maximum(jnp.sum(mass_before_V < top_p, axis=-1, keepdims=True), 1)
    threshold = jnp.take_along_axis(sorted_V, kept - 1, axis=-1)
    logits_V = jnp.where(logits_V < threshold, -jnp.inf, logits_V)
  return logits_V


def choose(logits_V, rng, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
  """One token id per row of logits [..., V]: the argmax at temperature 0, else a draw from the filtered
  softmax(logits / temperature)."""
  if temperature == 0:
    return jnp.argmax(logits_V, axis=-1)
  return jax.random.categorical(rng, filter_logits(logits_V.astype(jnp.float32) / temperature, top_k, top_p))


def sample(model: TransformerLM, variables, prompt_T, *, max_new_tokens: int, temperature: float = 1.0,
           top_k: int = 0, top_p: float = 1.0, seed: int = 0, max_len: int | None = None) -> np.ndarray:
  """The `max_new_tokens` tokens [max_new_tokens] sampled after the int tokens `prompt_T`.

  `variables`: {"params"[, "buffers"]}. Families that decode run one `TransformerLM.decode` step
  per token on a state sized T + max_new_tokens; the others recompute the causal forward over
  a buffer of `max_len` tokens (default T + max_new_tokens) each step. Compiled once per model,
  prompt length and sampling settings: another seed or prompt of the same length reuses it.
  """
  prompt_T = jnp.asarray(prompt_T, jnp.int32)
  T = prompt_T.shape[0]
  L = max(max_len or T + max_new_tokens, T + max_new_tokens)
  settings = (T, max_new_tokens, float(temperature), int(top_k), float(top_p), L)
  run = _memo(_SAMPLERS, (repr(model.config), *settings), lambda: _sampler(model, *settings))
  return np.asarray(run(variables, prompt_T, jax.random.PRNGKey(seed)))


_SAMPLERS: dict[tuple, Any] = {}  # (model config, settings) -> jitted sampler
_NLL: dict[str, Any] = {}         # model config -> jitted NLL sum


def _memo(table: dict, key, build):
  """table[key], built by `build()` on first use; at most 16 entries (the oldest leaves first), so a
  long session over many models or shapes does not keep every compiled program."""
  if key not in table:
    if len(table) >= 16:
      table.pop(next(iter(table)))
    table[key] = build()
  return table[key]


def _sampler(model: TransformerLM, T: int, max_new_tokens: int, temperature: float, top_k: int, top_p: float,
             L: int):
  """Jitted (variables, prompt_T, key) -> new tokens [max_new_tokens] (`sample` keeps one per config and settings)."""
  total = T + max_new_tokens

  def pick(logits_V, key, i):
    return choose(logits_V, jax.random.fold_in(key, i), temperature, top_k, top_p).astype(jnp.int32)

  if all(layer.family.decodes for layer in model.config.layer_configs()):  # every layer's family
    def run(variables, prompt_T, key):
      def read(states, tok_t):  # teacher-forced: the prompt token at position t
        tok, t = tok_t
        logits, states = model.apply(variables, tok.reshape(1, 1), t.reshape(1, 1), states,
                                     method=TransformerLM.decode)
        return states, logits[0, 0]

      states = init_decode_states(model.config, 1, total)
      states, logits = jax.lax.scan(read, states, (prompt_T, jnp.arange(T)))

      def write(carry, i):
        logits_V, states = carry
        tok = pick(logits_V, key, i)
        logits, states = model.apply(variables, tok.reshape(1, 1), (T + i).reshape(1, 1), states,
                                     method=TransformerLM.decode)
        return (logits[0, 0], states), tok

      return jax.lax.scan(write, (logits[-1], states), jnp.arange(max_new_tokens))[1]
  else:
    def run(variables, prompt_T, key):
      def write(buf_L, i):
        t = T - 1 + i  # the position whose logits predict the next token
        logits_V = jax.lax.dynamic_index_in_dim(model.apply(variables, buf_L[None])[0], t, keepdims=False)
        tok = pick(logits_V, key, i)
        return jax.lax.dynamic_update_index_in_dim(buf_L, tok, t + 1, 0), tok

      buf_L = jnp.zeros((L,), jnp.int32).at[:T].set(prompt_T)
      return jax.lax.scan(write, buf_L, jnp.arange(max_new_tokens))[1]

  return jax.jit(run)


@platform.for_this_host()
def generate(workdir: str, prompt: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
  """Samples a continuation of `prompt` from the workdir's newest checkpoint.

  Returns {"text": prompt + continuation, "continuation", "step", "tokens"}. Every user error
  (a bad setting, no config or checkpoint, a prompt the model cannot take) is a ConfigError
  raised before anything compiles.
  """
  s = sample_settings(overrides or {})
  cfg = load_workdir_config(workdir)
  prompt_T = encode(cfg, prompt)
  T, L = len(prompt_T), cfg.train.seq_len
  if T == 0:
    raise ConfigError("--prompt is empty; give at least one character to continue.")
  if T >= L:
    raise ConfigError(f"--prompt is {T} bytes, but the model in {workdir} takes at most train.seq_len={L} tokens"
                      f" and needs room to generate; shorten the prompt to fewer than {L} bytes.")
  s["max_new_tokens"] = s["max_new_tokens"] or min(DEFAULT_NEW_TOKENS, L - T)
  if T + s["max_new_tokens"] > L:
    raise ConfigError(f"--prompt ({T} bytes) + sample.max_new_tokens={s['max_new_tokens']} exceed the model's"
                      f" train.seq_len={L}; set sample.max_new_tokens to at most {L - T}.")
  config_lib.check_attention(cfg.model, L)
  _checkpoint_dir(workdir)
  model, variables, step = restore_variables(cfg, workdir)
  new = sample(model, variables, prompt_T, max_len=L, **s)
  return {"text": decode(np.concatenate([prompt_T, new])), "continuation": decode(new), "step": step,
          "tokens": new.tolist()}


# ----------------------------------------------------------------------------- evaluation


def _nll_sum(model: TransformerLM):
  """Jitted (variables, batch) -> (sum of weighted next-token NLL in nats, sum of weights)."""

  @jax.jit
  def nll(variables, batch):
    logits = model.apply(variables, batch["inputs"], segment_ids=batch["segment_ids"])
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    nll_BT = -jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
    return jnp.sum(nll_BT * batch["weights"]), jnp.sum(batch["weights"])

  return nll


def validation_stream(cfg: Config):
  """The packed validation batches `train` validates on: the same data pipeline (store, split, seed, shapes)."""
  from efficient_attn.data import pipeline

  d, t = cfg.data, cfg.train
  if d.val_fraction <= 0:
    raise ConfigError("data.val_fraction=0 in the workdir's config: it has no validation split to evaluate.")
  return pipeline(d, seq_len=t.seq_len, batch_size=t.batch_size, seed=t.seed).validation


@platform.for_this_host()
def evaluate(workdir: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
  """Validation loss of the workdir's newest checkpoint: {"step", "val_loss" (nats per byte), "perplexity",
  "bits_per_byte", "tokens", "batches", "split", "checkpoint"}.

  Token-weighted over `eval.batches` batches (0: every full batch of the validation split, once).
  """
  s = eval_settings(overrides or {})
  cfg = load_workdir_config(workdir)
  encode(cfg, "")  # refuses a non-byte tokenizer before anything loads
  _checkpoint_dir(workdir)
  stream = validation_stream(cfg)
  batches = s["batches"] or stream.batches_per_epoch
  model, variables, step = restore_variables(cfg, workdir)
  from efficient_attn.data.text import lm_example

  nll = _memo(_NLL, repr(model.config), lambda: _nll_sum(model))  # one compile per model config
  total, count = 0.0, 0.0
  for i in range(batches):
    n, w = nll(variables, lm_example(stream.batch(i)))
    total, count = total + float(n), count + float(w)
  loss = total / max(count, 1.0)
  return {"step": step, "val_loss": loss, "perplexity": math.exp(loss), "bits_per_byte": loss / math.log(2),
          "tokens": int(count), "batches": batches, "split": "validation",
          "checkpoint": os.path.join(os.path.abspath(workdir), "checkpoints", str(step))}

"""The anchor papers' published numbers that the experiments put beside ours, in one place.

Copied from the papers' tables; nothing here is measured. The experiments that use them:
attention_scaling (LRA Table 2), listops (LRA Table 1), moe_scaling (Switch Transformer),
mqar (Zoology), long_context (Ring Attention, LASP-2), scaling_laws (Kaplan, Chinchilla, Tay et al. 2022).
"""

# Tay et al. 2020 (Long Range Arena, ICLR 2021), Table 1: ListOps test accuracy in %.
LRA_TABLE1 = {
    "Transformer": 36.37,
    "Local Attention": 15.82,
    "Sparse Trans.": 17.07,
    "BigBird": 36.05,
    "Linear Trans.": 16.13,
    "Performer": 18.01,
}

# Tay et al. 2020, Table 2: steps/s and peak memory (GB per device) on 4x4 TPU v3, batch 32,
# byte-level text classification (encoder), at 1K / 2K / 3K / 4K tokens.
# Our attention family -> (LRA model, steps/s per length, GB per length).
LRA_LENGTHS = (1024, 2048, 3072, 4096)
LRA_TABLE2 = {
    "softmax": ("Transformer", (8.1, 4.9, 2.3, 1.4), (0.85, 2.65, 5.51, 9.48)),
    "local": ("Local Attention", (9.2, 8.4, 7.4, 7.4), (0.42, 0.76, 1.06, 1.37)),
    "sparse": ("BigBird", (7.4, 3.9, 2.7, 1.5), (0.77, 1.49, 2.18, 2.88)),
    "linear": ("Linear Trans.", (9.1, 9.3, 8.6, 7.8), (0.37, 0.57, 0.80, 1.03)),
    "performer": ("Performer", (9.5, 9.4, 8.7, 8.0), (0.37, 0.59, 0.82, 1.06)),
}
LRA_TABLE2_NOTE = ("LRA Table 2 (Tay et al. 2020, ICLR 2021): 4x4 TPU v3, batch 32, byte-level text classification"
                   " (bidirectional encoder). At 4K: Performer 5.7x faster at 0.11x the memory, Linear Transformer"
                   " 5.6x / 0.11x, Local Attention 5.3x / 0.14x, BigBird 1.1x / 0.30x.")

# Fedus et al. 2021 (Switch Transformers), Figure 1 / Table 1.
SWITCH_NOTE = ("Switch-Base reaches T5-Base quality up to 7x faster at equal FLOPs per token, with gains growing"
               " with the number of experts (up to 128+ experts, 10^5+ steps, C4)")

# Arora et al. 2023 (Zoology), Figure 2 and its discussion.
ZOOLOGY_NOTE = (
    "Zoology (Arora et al. 2023) traced most of the perplexity gap between attention and "
    "gated-convolution language models (H3, Hyena, RWKV and relatives) to associative recall of "
    "earlier tokens, and introduced multi-query associative recall (MQAR) to measure it. On MQAR "
    "attention solves the task at every sequence length and number of key-value pairs they tried "
    "with a small, fixed model width, whereas gated-convolution and kernelized (linear) attention "
    "models need a width that grows with the number of pairs (and sequence length) to keep up, "
    "matching their theory that such recurrent-state models must store all pairs in a state whose "
    "size scales with the width; hybrids that add input-dependent sparse attention close most of "
    "the gap."
)

# What each family's own paper reports on MQAR. None prints accuracies as numbers: every comparison is a
# plot of accuracy against model width, so these are the papers' settings and their stated outcome, never
# numbers read off a figure. Family -> (source, their setting, what the text / figure states).
MQAR_PUBLISHED = {
    "softmax": ("Zoology Fig. 2; GLA §5.2", "T 64-256, 4-16 pairs, vocab 8192, d 64-512, best of 4 lrs",
                "solves every setting (GLA: perfect scores in all settings)"),
    "linear": ("Zoology Fig. 2 (as a kernelized baseline)", "as above",
               "needs width growing with the number of pairs; no number in the text"),
    "performer": ("none found", "-", "no MQAR result published"),
    "retnet": ("GLA Fig. 4", "Zoology's settings, 2 heads", "below GLA (plot only)"),
    "gla": ("GLA Fig. 4", "Zoology's settings, 2 heads", "above RetNet and Mamba, below attention (plot only)"),
    "mamba2": ("Mamba-2 Fig. 8", "T 256-1024, d 32-256 (a harder variant)",
               "performs well across all settings, far above Mamba-1 (plot only)"),
    "deltanet": ("DeltaNet §4.1 / Fig. 2", "T 512, 64 pairs (Zoology's hardest)",
                 "solves it, without a short convolution (plot only)"),
    "gated_deltanet": ("none found", "-", "the paper evaluates needle-in-a-haystack, not MQAR"),
    "based": ("Based Fig. 2", "test T 64 with 8 pairs among others; vocab 8192, d 48-128",
              "close to attention at small state sizes, with short convolutions, not a window (plot only)"),
}
MQAR_PUBLISHED_NOTE = (
    "Published: what each family's own paper states about MQAR (all give plots, none prints accuracies), at"
    " their settings: vocabulary 8192 (ours 64), learning rates swept, tens of epochs of 100k rows (ours one rate,"
    " 400 steps of 64 rows). Read it as the expected ranking, not as a number to match."
)

# Liu, Zaharia & Abbeel 2023 (Ring Attention with Blockwise Transformers) and Sun et al. 2025 (LASP-2): their
# claims about sequence parallelism, stated as the papers state them (abstracts and method sections).
LONG_CONTEXT_NOTE = (
    "Ring Attention (Liu, Zaharia & Abbeel 2023) passes key/value blocks around a ring of devices while each"
    " computes blockwise attention, so the longest trainable sequence grows linearly with the number of devices"
    " (exact softmax; the blocks moved per layer total the whole sequence's K/V, overlapped with compute)."
    " LASP-2 (Sun et al. 2025) splits linear-attention models the same way with one AllGather of per-device"
    " memory states, whose size does not depend on the sequence length; its abstract reports training 15.2%"
    " faster than LASP and 36.6% faster than Ring Attention at 2048K tokens on 64 GPUs. Here: the reach columns"
    " show the first claim for every family (memory per device falls about as 1/P), and the collective bytes of"
    " the recurrent families stay flat in T while softmax's ring moves all of K/V (tests/test_context*.py assert"
    " both). We do not measure multi-GPU speed on this machine."
)

# Kaplan et al. 2020 (Scaling Laws for Neural Language Models), Hoffmann et al. 2022 (Chinchilla), Besiroglu et
# al. 2024 (Chinchilla Scaling: A replication attempt), Tay et al. 2022 (Scaling Laws vs Model Architectures),
# Shen et al. 2024 (Scaling Laws for Linear Complexity Language Models): their statements, as the papers give them.
KAPLAN_ALPHA_C = 0.050      # L(C_min) = (C_c / C_min)^0.050, a pure power law (no irreducible term), Transformer
KAPLAN_N_OPT = 0.73         # N_opt ∝ C^0.73 (Kaplan et al. 2020)
CHINCHILLA_N_OPT = 0.50     # N_opt ∝ C^a, a = 0.50 / 0.49 / 0.46 by their approaches 1 / 2 / 3 (Table 2)
SCALING_NOTE = (
    f"Kaplan et al. 2020 fitted the Transformer's compute-efficient frontier as a pure power law with exponent"
    f" {KAPLAN_ALPHA_C} (no irreducible term, so not our α, which is measured above E) and N_opt ∝ C^{KAPLAN_N_OPT};"
    f" Hoffmann et al. 2022 (Chinchilla) found N_opt ∝ C^a with a ≈ {CHINCHILLA_N_OPT} (0.50 / 0.49 / 0.46 by"
    " their three approaches), with annealed runs per budget, and Besiroglu et al. 2024 showed their approach-3"
    " intervals were implausibly narrow, so point fits need bootstrap intervals. Tay et al. 2022 (Scaling Laws vs"
    " Model Architectures) found efficient-attention variants such as the Performer scaling worse than the vanilla"
    " Transformer in pretraining, and the best architecture changing with scale; Shen et al. 2024 fitted"
    " linear-complexity models (70M-7B) with scaling comparable to a softmax Transformer. Those are 10^18-10^22"
    " FLOPs; ours are 10^11, byte-level, on a CPU: read our α, E and N_opt exponents as this grid's, with their"
    " intervals, not as estimates of theirs."
)

# arXiv 2507.06457 (a systematic analysis of hybrid linear attention, 72 models): its headline findings, as stated.
HYBRID_NOTE = (
    "the systematic study of hybrid linear attention (arXiv 2507.06457, 72 models up to 1.3B parameters) reports"
    " language-modelling loss nearly flat across linear:full-attention ratios, while recall improves sharply as"
    " full-attention layers are added, most of the gain below a 3:1 ratio; the production hybrids sit there too"
    " (Qwen3-Next 3:1 Gated DeltaNet : softmax, MiniMax-01 7:1 lightning : softmax, Gemma 2/3 5:1 local : global)."
)

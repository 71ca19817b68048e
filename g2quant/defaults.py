"""Training defaults chosen by measurement (torch-free, so the CLI can show them in ``--help``).

train-lm's and the demo's settings: the best measured on PTB small, 13 epochs (docs/results.md §9).
Dropout 0.25 for "small" (the preset itself is Zaremba's, without dropout). Gumbel noise on 20 % of
the gate values (the G2 authors' p): float test 103.3 and hard i,f 116.9 against 111.5 and 119.8 with
noise on every value (p = 1).
"""
RECOMMENDED_DROPOUT = {"small": 0.25}
RECOMMENDED_NOISE_P = 0.2

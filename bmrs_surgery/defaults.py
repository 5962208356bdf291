"""Every default of the toolkit, in one place: the library's functions, :class:`~.job.Job`,
:class:`~.fit.FitConfig` and the command line's options all read them from here (a test checks
that ``--help`` shows these values).

The choices were measured (see docs/results.md): BMRS_U with 8 bits is the default rule (exact
BMRS_N pruned nothing while fitting, because dF approaches 0 from below for a gate at its prior);
continuous pruning; two epochs of fine-tuning with the deployed gates (E[theta] * mask). Fitting
lasts until the gates settle ("auto"), with a gate learning rate 33x the weights' (docs/settling.md:
a gate's mean must travel about 5.5 in log space before dF reaches 0, and Adam moves it at most about
one learning rate per step). The learning rates follow a cosine within each phase: higher accuracy
than a constant rate for under a point of compression (benchmarks/results/finetune_options/cpu.md).
"""

PRIOR = "uniform"  # reduced prior: "uniform" (BMRS_U) or "normal" (BMRS_N)
PRECISION_BITS = 8  # BMRS_U: bits of precision below which a gate counts as zero
MODE = "continuous"  # prune while fitting ("continuous") or once after it ("post-training")
EPOCHS = "auto"  # fitting epochs for a model without fitted gates: until they settle (settling.py, docs/settling.md)
FINETUNE_EPOCHS = 2
# --epochs auto: fit until the gates settle (bmrs_surgery/settling.py), at most MAX_STEPS steps
SETTLE_CHECK_STEPS = 100  # optimiser steps between two checks of the settling signal
SETTLE_PATIENCE = 3  # stable checks in a row that make a settled fit
SETTLE_FLIP_TOLERANCE = 0.02  # compression (fraction of parameters) that flips in a stable check
SETTLE_PROJECTED_TOLERANCE = 0.04  # compression projected to flip by the horizon, in a stable check
SETTLE_OBJECTIVE_TOLERANCE = 0.05  # change of the objective against the window's mean (settling.relative_change)
SETTLE_HORIZON = 9.0  # projection: times the steps done so far (by the end of a fit ten times as long)
SETTLE_MIN_STEPS = 500  # no fit is called settled before this many steps
MAX_STEPS = 4000  # the most optimiser steps --epochs auto fits for
AUTO_FINETUNE_STEPS = 300  # --epochs auto: fine-tuning lasts FINETUNE_EPOCHS epochs, or this many steps if more
PRUNE_EVERY = 1
BATCH_SIZE = 128
LR = 1.5e-3  # the weights' learning rate when fitting on labelled data (a network trained or fine-tuned here)
# ... and when fitting data without labels, by distillation to the model's own outputs (a pretrained
# model, all-MiniLM-L6-v2 in benchmarks/minilm.py, whose runs use it): at LR, three Adam steps took its
# sentence embeddings to a mean cosine of 0.28 with the original's
DISTILL_LR = 1e-4
GATE_LR = 5e-2  # gates travel at most about this far per Adam step: 5e-2 settles in fewer steps (docs/settling.md)
KL_WEIGHTING = "mean"  # mean KL over structures (the authors' code) or "elbo"
KL_SCALE = 1.0
KL_WARMUP_EPOCHS = 0
NOISE = "sample"  # one gate draw per example
INIT_MU = 0.0
INIT_LOG_SIGMA = -5.0
FINETUNE_GATES = "expected"  # fine-tune the deployed network (E[theta] * mask, posteriors frozen)
SEED = 0
DEVICE = "cpu"
BENCH_BATCH_SIZES = (1, 8, 32)
BENCH_RUNS = 20
THREADS = 0  # ONNX Runtime intra-op threads (0: all cores)
TOLERANCE = 1e-4  # proof: max abs output difference relative to the output scale
SWEEP_LEVELS = 0
ROUND_TO = None  # keep a multiple of N channels per group (None: exact widths)
CHECK_RATIO = 0.3  # check: share of every group pruned at random
DATA_WORKERS = 4  # DataLoader worker processes for imagefolder:DIR (at most the cores less one)
LATENCY_TARGET_BATCH = 1  # --target-latency: the batch size the latency is measured at
DISTILL_TEMPERATURE = 4.0  # --distill: softmax temperature of the teacher's and student's logits
DISTILL_WEIGHT = 0.5  # --distill: share of the loss that is the distillation term (the rest: labels)
# token data without labels: an embedding output is fitted by kappa * (1 - cos(student, original)),
# the negative log-likelihood of a von Mises-Fisher density exp(kappa cos) around the original
# model's direction (distill.py). kappa is the likelihood's precision, which a cosine loss does not
# fix by itself: 20 is the scale sentence-transformers' contrastive loss multiplies cosines by, so
# the scale an embedding model such as all-MiniLM-L6-v2 was trained with. Measured on MiniLM
# (benchmarks/minilm.py): kappa 1 lets the mean KL outweigh the data and the gates collapse; 384
# keeps nearly every structure.
DISTILL_KAPPA = 20.0
LR_SCHEDULE = "cosine"  # learning rates within each phase fall to 0 along half a cosine (or "constant"): benchmarks/results/finetune_options

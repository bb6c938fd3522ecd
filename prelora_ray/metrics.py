"""Metric and event names every run shares, defined once (MLflow, Ray reports and analysis/ all use these).

A strategy's own event metrics (e.g. relora_merges, lte_merges) and its phases are declared in its file
(`Strategy.metrics`, `Strategy.phases` in prelora_ray/strategies/): this module names no strategy.
"""

# per epoch
EPOCH = "epoch"
TRAIN_LOSS = "train_loss"
VAL_LOSS = "val_loss"
VAL_ACC = "val_acc"
VAL_N = "val_n"  # validation images scored (all workers)
VAL_CORRECT = "val_correct"  # of them, classified correctly
VAL_HITS = "val_hits"  # history only: each image right or wrong, packed (significance.pack_hits)
VAL_CORRECT_ARTIFACT = "val_correct.npy"  # the final epoch's per-image correctness, in the data set's order
EPOCH_TIME_S = "epoch_time_s"  # training only, validation excluded
THROUGHPUT = "throughput_img_s"  # all workers' training images / epoch_time_s
PHASE = "phase"  # the phase's name (string, in Ray reports): full, or one its strategy declares
PHASE_INDEX = "phase_index"  # the phase's stored number, never renumbered (MLflow): strategies.phases
TRAINABLE_PARAMS = "trainable_params"
TRAINABLE_FRACTION = "trainable_fraction"  # trainable / parameters of the plain ViT
PEAK_MEM_MB = "peak_mem_mb"  # CUDA max allocated in the epoch on GPU; process peak RSS on CPU
LR = "lr"
# bytes this worker all-reduced in the epoch (DDP gradients, merges, loss and metric sums) / optimizer steps; 0 with
# one worker
COMM_BYTES_PER_STEP = "comm_bytes_per_step"
# the epoch's speed-up against full training, measured in the run (prelora_ray/calibration.py): a full-training
# forward+backward's time over the run's own, same model and batch, the median over the epoch's calibration rounds;
# FULL epochs 1 (never measured); an epoch between measurements repeats the last one of its phase
STEP_SPEEDUP = "step_speedup"
STEP_SPEEDUP_LO = "step_speedup_lo"  # the lowest of the epoch's rounds
STEP_SPEEDUP_HI = "step_speedup_hi"  # the highest
CALIBRATION_TIME_S = "calibration_time_s"  # time the epoch spent calibrating (not in epoch_time_s)
NORM_PREFIX = "norm/"  # norm/<family>: mean weight norm of the family's layers at epoch end
LAYER_NORM_PREFIX = "layer_norm/"  # layer_norm/<family>/<layer>

# events every strategy reports (also repeated in each report once they happened; -1 before), beside its own
SWITCH_EPOCH = "switch_epoch"
FREEZE_EPOCH = "freeze_epoch"
RANKS = "ranks"  # {family: [rank per layer]}

# run summary
MEAN_EPOCH_TIME_S = "mean_epoch_time_s"  # the paper's "average training time per epoch"
FINAL_VAL_ACC = "final_val_acc"
BEST_VAL_ACC = "best_val_acc"
TOTAL_TRAIN_TIME_S = "total_train_time_s"
# the run's speed-up against full training: epochs / sum over epochs of 1 / step_speedup (prelora_ray/speedup.py);
# lo and hi from every epoch's lowest and highest round; 1 exactly for a run that trains full throughout
SPEEDUP = "speedup"
SPEEDUP_LO = "speedup_lo"
SPEEDUP_HI = "speedup_hi"

# MLflow tags of sweeps
ROLE_TAG = "prelora.role"  # parent | trial | baseline
SWEEP_TAG = "prelora.sweep"
PARETO_TAG = "pareto"
RUN_NAME_TAG = "prelora.run_name"
RESUMED_AT_TAG = "prelora.resumed_at"  # epochs at which the run resumed from a checkpoint (JSON list), if it ever did
SWITCH_PARAMS = (
    "prelora.tau",
    "prelora.zeta",
    "prelora.k",
    "prelora.m",
    "prelora.warmup",
    "prelora.r_min",
    "prelora.r_max",
)

# fork-from-trunk sweeps (tags of a trial's run; the parent run logs the two totals as metrics)
EPOCHS_TRAINED_TAG = "epochs_trained"  # epochs this run actually trained (0: never switched or reused)
FORK_TRUNK_RUN_TAG = "fork.trunk_run_id"
FORK_EPOCH_TAG = "fork.epoch"  # the trunk checkpoint the trial started from (epochs it did not train)
FORK_SWITCH_TAG = "fork.switch_epoch"  # the replayed switch epoch, or "never"
FORK_REUSED_TAG = "fork.reused_from"  # MLflow run id of the trial whose result this one reuses
EARLY_STOPPED_TAG = "prelora.early_stopped"  # "true": stopped at a rung by `early_stopping:` (orchestration/early_stop)
EARLY_STOPPED_EPOCH_TAG = "prelora.early_stopped_epoch"  # the epoch (0-based) of the rung it was stopped at
EARLY_STOPPED_BY_TAG = "prelora.early_stopped_by"  # the run (or "the trunk ...") that dominated it there
LOST_TAG = "prelora.lost"  # a trial run the sweep lost: started just before a kill, unknown to Ray Tune's snapshot
FORK_COPIED_TAG = "fork.copied"  # the trunk's epochs before the fork are in this run (copied once)
EPOCHS_TRAINED_TOTAL = "epochs_trained_total"
EPOCHS_NAIVE_TOTAL = "epochs_naive_total"  # what the same trials and baseline would train from scratch
REPEAT_TAG = "prelora.repeat"  # a repeat's index (1..N-1; repeat 0 is the trial's or baseline's own run)
REPEAT_SEED_TAG = "prelora.repeat_seed"  # the seed it trained with after its fork
REPEAT_OF_TAG = "prelora.repeat_of"  # the MLflow run id of the trial (or baseline) it repeats, also its parent
REPEATS_TAG = "prelora.repeats"  # on a repeated trial's or baseline's run: N
REPEATS = "repeats"  # the table's column and a repeated run's metric: N
VAL_ACC_SD = "val_acc_sd"  # the standard deviation of final_val_acc across the repeats
VAL_ACC_MEAN = "val_acc_mean"  # a repeated run's metric: the mean of its repeats' final_val_acc
SCAN_TAG = "prelora.scan"  # a switch-epoch scan's name, on its parent and its points

"""Tuner configuration: one frozen dataclass, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

OBJECTIVES = ("sft", "kto", "dpo")
TRAINERS = ("auto", "loop", "trl")
STARTS = ("base", "serving")


@dataclass(frozen=True)
class TunerConfig:
    """How the tuner selects data, trains, gates and schedules."""

    work_dir: Path
    """The tuner's own directory (candidates it trained, versions it downloaded, its lock): no server's. It
    reaches servers through their API only, so it may run on any machine."""
    model: Path
    """The base model folder the servers serve (the adapter must fit it)."""
    targets: tuple[str, ...] = ("localhost:50051",)
    """The servers' gRPC addresses: every replica. It learns from all of them, uploads each candidate to each, and
    promotes on each; the first also runs the gate's suite."""
    objective: str = "sft"
    """'sft' (instruction tuning on 👍 answers and corrections), 'kto' (👍 and 👎, unpaired) or 'dpo' (a 👎 answer
    and its correction as a preference pair)."""
    trainer: str = "auto"
    """'loop' (our short loop: sft and kto), 'trl' (TRL's trainers: sft, kto and dpo; `accelerate launch` scales them)
    or 'auto': the loop on CPU, where it is 1.5x to 2.3x faster, TRL on GPU and for dpo (see
    benchmarks/results/training-*.md)."""
    launcher: str = ""
    """A command that starts TRL training in processes of its own, e.g. 'accelerate launch --multi_gpu
    --num_processes 4' (several GPUs; DeepSpeed or FSDP through an accelerate config file); empty: in this process."""
    start_from: str = "base"
    """'base': each candidate is a fresh adapter on the base model, trained on everything the serving version learnt
    (its lineage's exchange ids) and the new feedback, so cycles never stack adapters on adapters; 'serving': the
    serving adapter trained further on the new feedback alone (shorter runs, but after 480 ratings in the closed loop
    two stacked candidates lost 17.5 points on plain instructions, -28.7 to -6.2, where one run from the base on 480
    ratings did not: +7.5, -5.0 to +20.0; benchmarks/results/loop-2026-12-02-seed0.md, recipe-2026-12-04.md)."""
    include_older: bool = False
    """Also train on every rating older than the last judged run, learnt by the serving version or not: those of
    runs rejected for contradicting earlier feedback (suspected poisoning) too, which by default are never trained on
    again."""
    max_user_share: float = 0.5
    """No single rater may contribute more than this share of the training examples."""
    max_repetition: float = 0.3
    """A 👍 answer or correction whose word 3-grams repeat more than this share is never trained on:
    learning an answer that loops, however rated, teaches the model to loop."""
    blocklist: tuple[str, ...] = ()
    """Case-insensitive phrases; an exchange containing one is never trained on."""
    rehearsal: int = 40
    """Plain instructions of the tuner's own (rehearsal.json, 40 of them) the base model answers; one answer per
    prompt that does not loop is trained on beside the feedback in every run (tuner/rehearsal.py), so that what users
    did not rate keeps the base's behaviour. 0: train on feedback alone."""
    rehearsal_share: float = 0.0
    """Repeat the rehearsal examples until they are this share of what the objective learns from (0: each once).
    On the recipe benchmark, two thirds with 150 steps did not beat the default (rehearsal once, 60 steps): rated
    -3.6 (-10.7 to +3.6), plain +3.8 (-10.0 to +17.5); benchmarks/results/recipe-2026-12-05-rehearsal-share.md.
    At learning rate 4e-3 it held plain at +17.5 (+3.8 to +31.2) against -10.0 without it, rated +34.3 against +36.4
    (recipe-2026-12-06.md), but trained 17 minutes against 3 on 2 CPU cores: a candidate default, not yet the loop's."""
    steps: int = 60
    """Most training steps per run."""
    epochs: float = 3.0
    """Passes over the training examples, within `steps`: a run on little data stops early instead of
    memorising it (a handful of ratings, honest or not, should move the model only a little)."""
    batch_size: int = 4
    learning_rate: float = 1e-3
    rank: int = 8
    lora_alpha: int = 16
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    max_length: int = 512
    """Longest training sequence in tokens (prompt plus answer); a longer answer loses its end."""
    kto_beta: float = 0.1
    dpo_beta: float = 0.1
    seed: int = 0
    improvement_z: float = 1.0
    """The candidate must widen the 👍/👎 margin on new held-out feedback by more than this many standard errors
    of the per-answer differences: a run that barely moved the model (a few examples) is not promoted. One retrained
    from the base on all the serving adapter learnt need only not fall by `history_z` (evaluate.new_feedback_fails)."""
    history_tolerance: float = 0.05
    """A candidate is rejected when its 👍/👎 margin on earlier held-out feedback (mean log-likelihood per
    token) falls below the serving adapter's by more than this..."""
    history_z: float = 2.0
    """...or by more than this many standard errors of the per-answer differences (a paired test, which sees
    a small but consistent fall). Poisoned new ratings show up as such a fall; honest ones raise the margin."""
    harm_alpha: float = 0.05
    """A candidate is rejected when it loses more of the suite's answer pairs than it wins by more than chance
    allows at this level (McNemar's exact test, one-sided; evaluate.paired_loss states its power)."""
    min_new_ratings: int = 50
    """A run starts once this many ratings arrived since the last candidate."""
    period_seconds: float = 0.0
    """Also start a run this often (0: never on a timer); it needs at least one new rating."""
    poll_seconds: float = 5.0
    """How often the scheduler looks at the store."""
    retry_seconds: float = 300.0
    """After a failed run, how long before new ratings may start another (requests always do). After a skipped run,
    or one rejected for too little evidence, the next waits for min_new_ratings more instead."""
    extra: dict = field(default_factory=dict, compare=False)
    """Free-form notes stored with each candidate."""

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if self.trainer not in TRAINERS:
            raise ValueError(f"trainer must be one of {', '.join(TRAINERS)}, got {self.trainer!r}")
        if self.start_from not in STARTS:
            raise ValueError(f"start_from must be one of {', '.join(STARTS)}, got {self.start_from!r}")
        if self.objective == "dpo" and self.trainer == "loop":
            raise ValueError("the loop has no dpo: use trainer 'trl' or 'auto'")
        if self.launcher and self.trainer == "loop":
            raise ValueError("a launcher starts TRL's trainers: use trainer 'trl' or 'auto'")
        if not 0 < self.max_repetition <= 1:
            raise ValueError("max_repetition must be in (0, 1]")
        if not 0 < self.max_user_share <= 1:
            raise ValueError("max_user_share must be in (0, 1]")
        if not 0 < self.harm_alpha < 1:
            raise ValueError("harm_alpha must be in (0, 1)")
        if self.epochs <= 0:
            raise ValueError("epochs must be positive")
        if min(self.steps, self.batch_size, self.rank, self.max_length, self.min_new_ratings) < 1:
            raise ValueError("steps, batch_size, rank, max_length and min_new_ratings must be positive")
        if self.rehearsal < 0:
            raise ValueError("rehearsal must be 0 or more")
        if not 0 <= self.rehearsal_share < 1:
            raise ValueError("rehearsal_share must be in [0, 1)")
        if not self.targets:
            raise ValueError("targets must name at least one server")
        for name in ("work_dir", "model"):
            object.__setattr__(self, name, Path(getattr(self, name)).expanduser().resolve())

    @property
    def primary(self) -> str:
        return self.targets[0]

    def hyperparameters(self) -> dict:
        keys = ("objective", "trainer", "steps", "epochs", "batch_size", "learning_rate", "rank", "lora_alpha",
                "target_modules", "max_length", "kto_beta", "dpo_beta", "seed", "max_user_share", "max_repetition",
                "start_from", "include_older", "rehearsal", "rehearsal_share")
        return {k: getattr(self, k) for k in keys}

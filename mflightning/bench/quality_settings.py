"""What the quality benchmark runs: its methods, metrics, settings and grid (`mflightning.bench.quality`)."""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from mflightning.data.synthetic import CAPTIONS_PER_IMAGE, WorldSizes
from mflightning.families import FAMILIES, BackboneFamily, ModelSize, TaskSettings
from mflightning.families import TASKS as VL_TASKS
from mflightning.pretrain import PretrainConfig

from .quality_classification import CLASSES, images_per_class

MODELS = tuple(FAMILIES)  # ("blip", "xvlm"): the registered backbone families
# The vision-language tasks run by default; `--tasks classification` adds the vision-only miniature
# (`quality_classification.py`: the same masks, the image encoder fine-tuned on the world's objects).
TASKS = (*VL_TASKS, "classification")
TASK_TITLES = {"retrieval": "Image-text retrieval", "captioning": "Image captioning", "vqa": "VQA",
               "classification": "Image classification (vision only)"}


@dataclass(frozen=True)
class MethodSpec:
    """One row of the tables: a `prune()` method with its ablation switches."""

    label: str
    method: str | None  # None: the dense model
    allocation: str | None = None
    invert: bool = False
    rounds: int | None = None  # iterative methods' rounds (None: PruningConfig's default)


METHODS: dict[str, MethodSpec] = {
    "dense": MethodSpec("Dense", None),
    "random": MethodSpec("Random", "random"),
    "omp": MethodSpec("OMP", "omp"),
    "lamp": MethodSpec("LAMP", "lamp"),
    "snip": MethodSpec("SNIP", "snip"),
    "wanda": MethodSpec("Wanda", "wanda"),
    "multiflow": MethodSpec("MultiFlow", "multiflow"),
    "mf_no_multimodality": MethodSpec("MultiFlow w/o multimodality", "multiflow", allocation="magnitude"),
    "mf_no_distribution": MethodSpec("MultiFlow w/o distribution", "multiflow", allocation="global"),
    "mf_inverted": MethodSpec("MultiFlow w/ inversion", "multiflow", invert=True),
    # the paper's strongest baselines and SparseGPT, offered by --methods (they update the kept weights)
    "sparsegpt": MethodSpec("SparseGPT", "sparsegpt"),
    "chita": MethodSpec("CHITA", "chita"),
    # 2 rounds of 4 of the 8 calibration batches: with the default 10 rounds each round's model had one
    # gradient row, and its first-order step blew weights up (total norm 17 -> 7,700; every task collapsed)
    "chita++": MethodSpec("CHITA++", "chita++", rounds=2),
}
# the default grid: the committed tables' methods (the weight-updating ones join with --methods)
DEFAULT_METHODS = tuple(m for m in METHODS if m not in ("sparsegpt", "chita", "chita++"))

METRICS: dict[str, tuple[tuple[str, str], ...]] = {  # task -> (metric key, column label)
    "retrieval": (("txt_r1", "TR@1"), ("txt_r5", "TR@5"), ("img_r1", "IR@1"), ("img_r5", "IR@5")),
    "captioning": (("bleu4", "BLEU@4"), ("cider", "CIDEr")),
    "vqa": (("vqa_acc", "VQA acc"),),
    "classification": (("top1", "Top-1"), ("top5", "Top-5")),
}


# The one number per task the cross-task summary normalises (the mean of these metrics): R@1 both
# directions, CIDEr, VQA accuracy.
HEADLINE: dict[str, tuple[str, ...]] = {"retrieval": ("txt_r1", "img_r1"), "captioning": ("cider",),
                                        "vqa": ("vqa_acc",), "classification": ("top1",)}
HEADLINE_LABELS = {"retrieval": "R@1 (TR, IR mean)", "captioning": "CIDEr", "vqa": "VQA acc",
                   "classification": "Top-1"}


BUDGET_FIELDS = tuple(f.name for f in fields(TaskSettings))  # ("epochs", "lr", "batch_size")


CLASSIFICATION_EPOCHS, CLASSIFICATION_LR = 20, 1e-3


def default_budgets() -> dict[str, dict[str, TaskSettings]]:
    """The fine-tuning budget of every (model, task): epochs, learning rate, batch size.

    Chosen on world seeds 0 and 1 with the 60-epoch pretraining (`QualitySettings.pretrain_epochs`). XVLM
    (pretrained at lr 2e-3 with the caption LM loss, no dropout) learns faster at higher rates: captioning
    lr 2e-3, VQA 1e-3 at batch 16 (2e-3 collapses it to the per-type prior); retrieval 3e-4 (at 1e-3 the
    dense model over-fits: IR@1 14.7 against 22.3 for OMP's 63% masks, 22.4 dense at 3e-4). BLIP's VQA
    learns slowest: 16 epochs at batch 16, lr 1e-3 (8 epochs: 51.8% on world 0, only 5.5 points above the
    image-blind 46.3%; 16 epochs: 56.2%).
    """
    return {
        "blip": {"retrieval": TaskSettings(epochs=3, lr=5e-4, batch_size=32),
                 "captioning": TaskSettings(epochs=3, lr=5e-4, batch_size=32),
                 "vqa": TaskSettings(epochs=16, lr=1e-3, batch_size=16),
                 "classification": TaskSettings(epochs=CLASSIFICATION_EPOCHS, lr=CLASSIFICATION_LR, batch_size=32)},
        "xvlm": {"retrieval": TaskSettings(epochs=3, lr=3e-4, batch_size=32),
                 "captioning": TaskSettings(epochs=3, lr=2e-3, batch_size=32),
                 "vqa": TaskSettings(epochs=8, lr=1e-3, batch_size=16),
                 "classification": TaskSettings(epochs=CLASSIFICATION_EPOCHS, lr=CLASSIFICATION_LR, batch_size=32)},
    }


def set_budget(budgets: dict[str, dict[str, TaskSettings]], model: str, task: str, name: str, value) -> None:
    """Set one field of the (model, task) budget in place; `model`/`task` "*" means every one (errors name the key)."""
    key = f"{model}.{task}.{name}"
    models = MODELS if model == "*" else (model,)
    tasks = TASKS if task == "*" else (task,)
    if any(m not in MODELS for m in models):
        raise ValueError(f"budget {key}: unknown model {model!r}; choose from {list(MODELS)} or *")
    if any(t not in TASKS for t in tasks):
        raise ValueError(f"budget {key}: unknown task {task!r}; choose from {list(TASKS)} or *")
    if name not in BUDGET_FIELDS:
        raise ValueError(f"budget {key}: unknown field {name!r}; choose from {list(BUDGET_FIELDS)}")
    for m in models:
        for t in tasks:
            try:
                budgets[m][t] = replace(budgets[m][t], **{name: value})
            except ValueError as error:
                raise ValueError(f"budget {key}={value!r}: {error}") from None


@dataclass
class QualitySettings:
    """Everything the results depend on (written to settings.json; a resumed run must match it)."""

    models: tuple[str, ...] = MODELS
    methods: tuple[str, ...] = DEFAULT_METHODS
    sparsities: tuple[float, ...] = (0.63, 0.75, 0.9)
    seeds: tuple[int, ...] = (0, 1, 2)
    tasks: tuple[str, ...] = VL_TASKS
    world_seed: int = 0
    sizes: WorldSizes = field(default_factory=lambda: WorldSizes(
        calibration=800, train=160, val=1, test=60, vqa_train=160, vg=60, vqa_test=60, questions_per_image=3))
    image_size: int = 32
    patch_size: int = 8
    hidden_size: int = 64
    layers: int = 2  # per encoder (BLIP: vision, text; XVLM: vision, text, fusion)
    heads: int = 2
    # 60 epochs of the caption split (~48k image-caption pairs): at 20 the ITM loss stays at its prior (0.64), the
    # fusion never grounds the text in the image, and VQA stays at the image-blind level
    pretrain_epochs: int = 60
    # per model: the small XVLM's ITM only starts learning at 2e-3 (at 1e-3 it stays at its prior)
    pretrain_lrs: dict[str, float] = field(default_factory=lambda: {"blip": 1e-3, "xvlm": 2e-3})
    pretrain_batch_size: int = 32
    # model -> task -> fine-tuning budget; a partial dict given here is completed from `default_budgets()`
    budgets: dict[str, dict[str, TaskSettings]] = field(default_factory=default_budgets)
    calibration_batches: int = 8
    calibration_batch_size: int = 32
    k_test: int = 16
    pattern: str | None = None  # N:M (e.g. "2:4"): every method prunes to this pattern; sparsities = 1 - N/M
    # DataLoader processes per loader (pretraining, calibration, fine-tuning). 0 on CPU, where the cores
    # train; the GPU preset needs them: decoding a batch of 64 images at 224 px in the training process
    # took 126-142 ms on one core of the CPU machine, which would leave the GPU waiting. Results do not
    # depend on it (no random transforms), so it is not part of the fingerprint.
    loader_workers: int = 0

    def __post_init__(self) -> None:
        if self.pattern is not None:
            from mflightning.pruning import parse_pattern

            n, m = parse_pattern(self.pattern)
            self.pattern, self.sparsities = f"{n}:{m}", (1.0 - n / m,)
        for name, allowed in (("models", MODELS), ("methods", tuple(METHODS)), ("tasks", TASKS)):
            values = tuple(getattr(self, name))
            bad = [v for v in values if v not in allowed]
            if bad or not values:
                raise ValueError(f"--{name}: unknown or empty {bad or values}; choose from {list(allowed)}")
            setattr(self, name, values)
        self.sparsities = tuple(float(s) for s in self.sparsities)
        bad = [s for s in self.sparsities if not 0.0 < s < 1.0]
        if bad or not self.sparsities:
            raise ValueError(f"--sparsities must be in (0, 1), got {list(self.sparsities)}")
        self.seeds = tuple(int(s) for s in self.seeds)
        if not self.seeds:
            raise ValueError("--seeds needs at least one seed")
        if self.image_size % self.patch_size:
            raise ValueError(f"--image-size {self.image_size} must be a multiple of --patch-size {self.patch_size}")
        if self.loader_workers < 0:
            raise ValueError(f"--loader-workers must be >= 0, got {self.loader_workers}")
        for name in ("hidden_size", "layers", "heads", "pretrain_epochs", "calibration_batches",
                     "calibration_batch_size", "k_test"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        lrs = {"blip": 1e-3, "xvlm": 2e-3}
        for model, lr in dict(self.pretrain_lrs).items():
            if model not in MODELS or not float(lr) > 0:
                raise ValueError(f"pretrain_lrs: {model!r}: {lr!r} (models {list(MODELS)}, lr > 0)")
            lrs[model] = float(lr)
        self.pretrain_lrs = lrs
        budgets = default_budgets()
        for model, per_task in dict(self.budgets).items():
            if model not in MODELS:
                raise ValueError(f"budgets: unknown model {model!r}; choose from {list(MODELS)}")
            for task, budget in dict(per_task).items():
                if task not in TASKS:
                    raise ValueError(f"budgets[{model!r}]: unknown task {task!r}; choose from {list(TASKS)}")
                if not isinstance(budget, TaskSettings):
                    budget = TaskSettings(**budget)  # e.g. a dict read back from settings.json
                budgets[model][task] = replace(budget)  # validated again, and not shared with the caller
        self.budgets = budgets

    def model_size(self) -> ModelSize:
        """The sizes of the small models (every family's)."""
        return ModelSize(hidden_size=self.hidden_size, layers=self.layers, heads=self.heads,
                         image_size=self.image_size, patch_size=self.patch_size)

    def pretrain_config(self, family: BackboneFamily) -> PretrainConfig:
        """The pretraining config of `family`'s small model (its `backbone` dict is the family's own format)."""
        return PretrainConfig(backbone=family.small_config(self.model_size()), epochs=self.pretrain_epochs,
                              batch_size=self.pretrain_batch_size, lr=self.pretrain_lrs[family.name],
                              warmup_steps=20)

    def budget(self, model: str, task: str) -> TaskSettings:
        """The fine-tuning budget (epochs, lr, batch size) of `model` on `task`."""
        return self.budgets[model][task]

    @classmethod
    def tiny(cls) -> "QualitySettings":
        """Seconds-long plumbing check (tests): minimal world and model, one epoch."""
        return cls(models=("blip",), methods=("dense", "multiflow"), sparsities=(0.75,), seeds=(0,),
                   sizes=WorldSizes(calibration=16, train=8, val=1, test=4, vqa_train=8, vg=2, vqa_test=4,
                                    questions_per_image=1),
                   hidden_size=32, layers=1, patch_size=16, pretrain_epochs=1,
                   budgets={m: {t: TaskSettings(epochs=1, lr=5e-4, batch_size=8) for t in TASKS} for m in MODELS},
                   calibration_batches=1, calibration_batch_size=8, pretrain_batch_size=8, k_test=4)

    @classmethod
    def gpu(cls, **grid) -> "QualitySettings":
        """Sizes for one GPU (`--scale gpu`): a 10x larger world at 224 px (patch 16), models 4 layers x 256
        wide with 4 heads, longer pretraining and fine-tuning, 3 seeds. `grid` (models, methods,
        sparsities, seeds, tasks, world_seed, pattern) overrides the grid. Not run yet: no GPU was lent
        to the sessions that wrote it. The full grid is 465,024 fine-tuning steps (`optimizer_steps`), an
        estimated 3-7 hours on one H100-class GPU at 20-40 ms per step plus evaluation (unmeasured)."""
        task = {"retrieval": TaskSettings(epochs=6, lr=3e-4, batch_size=64),
                "captioning": TaskSettings(epochs=6, lr=3e-4, batch_size=64),
                "vqa": TaskSettings(epochs=16, lr=5e-4, batch_size=64)}
        settings = dict(seeds=(0, 1, 2),
                        sizes=WorldSizes(calibration=8000, train=1600, val=1, test=500, vqa_train=1600, vg=500,
                                         vqa_test=500, questions_per_image=3),
                        image_size=224, patch_size=16, hidden_size=256, layers=4, heads=4, pretrain_epochs=40,
                        pretrain_batch_size=128, pretrain_lrs={"blip": 5e-4, "xvlm": 1e-3},
                        budgets={m: dict(task) for m in MODELS}, calibration_batches=32, calibration_batch_size=64,
                        k_test=64, loader_workers=8)
        settings.update({k: v for k, v in grid.items() if v is not None})
        return cls(**settings)



# ---------------------------------------------------------------------------------------- the grid
def run_key(method: str, sparsity: float | None, seed: int) -> str:
    return f"{method}@{'0' if sparsity is None else f'{sparsity:g}'}-s{seed}"


def grid(s: QualitySettings) -> list[tuple[str, str, float | None]]:
    """(model, method, sparsity) of every pruned or dense backbone, dense once per model."""
    out = []
    for model in s.models:
        for method in s.methods:
            for sparsity in ([None] if METHODS[method].method is None else s.sparsities):
                out.append((model, method, sparsity))
    return out


def optimizer_steps(s: QualitySettings) -> dict[str, Any]:
    """The optimizer steps the grid takes, counted from the world sizes, to plan a run (`--plan`).

    Training drops partial batches. Captions per training image are taken at the mean of
    `CAPTIONS_PER_IMAGE` (the world draws 3-5), so retrieval and captioning counts are within a few
    steps of a generated world's; VQA trains on the VQA and VG questions.
    """
    captions = s.sizes.train * sum(CAPTIONS_PER_IMAGE) / 2
    questions = (s.sizes.vqa_train + s.sizes.vg) * s.sizes.questions_per_image
    classification = len(CLASSES) * images_per_class(s.sizes.train, s.sizes.test)[0]
    examples = {"retrieval": captions, "captioning": captions, "vqa": questions, "classification": classification}
    per_run = {m: {t: s.budget(m, t).epochs * int(examples[t] // s.budget(m, t).batch_size) for t in s.tasks}
               for m in s.models}
    backbones = Counter(model for model, _, _ in grid(s))
    return {
        "backbones": sum(backbones.values()),
        "fine_tunings": sum(backbones.values()) * len(s.tasks) * len(s.seeds),
        "pretrain_steps": {m: s.pretrain_epochs * (s.sizes.calibration // s.pretrain_batch_size) for m in s.models},
        "steps_per_fine_tuning": per_run,
        "fine_tuning_steps": sum(backbones[m] * len(s.seeds) * sum(per_run[m].values()) for m in s.models),
    }


def settings_fingerprint(s: QualitySettings) -> dict:
    """What a resumed run must share with the stored runs (the grid itself may grow)."""
    d = asdict(s)
    for name in ("models", "methods", "sparsities", "seeds", "tasks", "loader_workers"):
        d.pop(name)
    if d["pattern"] is None:  # unstructured runs keep the fingerprint they had before patterns existed
        d.pop("pattern")
    if "classification" not in s.tasks:  # runs without it keep the fingerprint they had before it existed
        for per_task in d["budgets"].values():
            per_task.pop("classification", None)
    return d

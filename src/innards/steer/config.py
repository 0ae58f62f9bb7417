"""Config pieces shared by the steering commands: generation settings, the meta-model source, the
inputs common to ``steer generate`` and ``steer sweep``, and the checks run before any model loads."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from innards.config import at_least, load_yaml, positive, require, to_dict, within
from innards.errors import InnardsError
from innards.glp.model import GLP
from innards.glp.projection import ProjectionConfig
from innards.hub import is_hub_id
from innards.models.config import MODEL_ALIASES, ModelConfig
from innards.run import CONFIG_FILE, Run
from innards.steer.texts import prompts_path

POSITIONS = ("generated", "prompt", "all", "last")
Positions = Literal["generated", "prompt", "all", "last"]
NORM_STATS = ("mean_norm", "rms_norm")


@dataclass
class GenerationConfig:
    """How continuations are generated: greedy or sampled, batched, with a KV cache."""

    max_new_tokens: int = 30
    """tokens generated per prompt"""
    temperature: float = 0.0
    """sampling temperature (0 = greedy decoding)"""
    top_k: int = 0
    """sample among the k most likely tokens only (0 = no limit)"""
    top_p: float = 1.0
    """nucleus sampling: sample within the smallest token set holding this probability (1 = no limit)"""
    seed: int = 0
    """seed of sampling and of the meta-model's noise (a sweep also seeds its evaluator split and bootstrap with it)"""
    batch_size: int = 32
    """prompts generated together (left-padded)"""

    FLAG_PREFIX = "generation"

    def __post_init__(self) -> None:
        at_least(self, 1, "max_new_tokens", "batch_size")
        at_least(self, 0, "temperature", "top_k", "seed")
        within(self, "top_p", 0.0, 1.0, open_lo=True)

    def hf_kwargs(self) -> dict[str, object]:
        """Sampling arguments for ``model.generate`` (greedy when temperature is 0)."""
        if self.temperature == 0:
            return {"do_sample": False}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k}


@dataclass
class GLPSource:
    """The meta-model that projects or guides the steered activations: a GLP folder or hub id."""

    path: str | None = None
    """GLP folder (innards or reference layout) or hub id org/name[@revision]; unset = no meta-model"""
    revision: str | None = None
    """hub revision of the GLP (branch, tag or commit)"""
    checkpoint: str | None = None
    """checkpoint inside the GLP: final (default), a reference epoch_XXXX or an innards step_XXXXXXX"""
    restats: str | None = None
    """activation store whose whole-store statistics replace the GLP's normalisation statistics"""

    FLAG_PREFIX = "glp"

    def __post_init__(self) -> None:
        if self.path == "":
            self.path = None

    def check(self) -> None:
        """One-line error for a GLP or restats store that is neither a folder nor a hub id."""
        if self.path is not None and not Path(self.path).expanduser().is_dir() and not is_hub_id(self.path):
            raise InnardsError(f"--glp: no GLP folder (and not a hub id): {self.path}")
        if self.restats is not None and not Path(self.restats).is_dir():
            raise InnardsError(f"--restats: activation store not found: {self.restats}")

    def load(self) -> GLP | None:
        """The GLP, loaded through :meth:`GLP.from_pretrained` with revision, checkpoint and restats."""
        if self.path is None:
            return None
        return GLP.from_pretrained(self.path, revision=self.revision, checkpoint=self.checkpoint,
                                   restats=self.restats)


def reopen_if_extended(run: Run, cfg: object) -> bool:
    """True when a complete run differs only in settings that add or select cached work (the ``free`` keys
    it was opened with): its config is updated and it is reopened to compute what is new."""
    if run.state != "complete" or load_yaml(run.root / CONFIG_FILE) == to_dict(cfg):
        return False
    run.reopen(cfg)
    return True


def glp_provenance(glp: GLP, spec: str) -> str | dict[str, str]:
    """Where a loaded GLP came from: its hub record (a hub id is not a path), else the folder as given."""
    return glp.meta.get("hub") or spec


@dataclass
class SteerInputs:
    """What both steered-generation commands read: model, site, vector, prompts, strength unit, meta-model."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """the language model (a plain string is taken as its name)"""
    site: str = ""
    """activation site to steer, e.g. blocks.3.resid_post (required)"""
    vector: str = ""
    """steering vector: .safetensors / .pt / .npy file (FILE#ROW picks a row) or sae:SAE:LATENT (required)"""
    prompts: str = "stories"
    """file of prompts, one per line ('stories' = the packaged story openings)"""
    positions: Positions = "generated"
    """positions steered: generated | prompt | all | last (see innards.steer.generate)"""
    norm: float | None = None
    """||a||, the activation norm that one unit of strength means (else from --acts or the GLP's statistics)"""
    acts: str | None = None
    """activation store whose statistics give ||a||"""
    norm_stat: Literal["mean_norm", "rms_norm"] = "mean_norm"
    """which statistic is ||a||: the mean row norm or the root mean square"""
    glp: GLPSource = field(default_factory=GLPSource)
    """meta-model that projects every edited activation onto its manifold"""
    project: ProjectionConfig = field(default_factory=ProjectionConfig)
    """the on-manifold projection (SDEdit) applied when a GLP is given"""
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    """decoding settings"""
    overwrite: bool = False
    """replace an existing output made with other settings"""

    def __post_init__(self) -> None:
        if isinstance(self.model, str):
            self.model = ModelConfig(name=self.model)
        if isinstance(self.glp, str) or self.glp is None:
            self.glp = GLPSource(path=self.glp or None)
        if self.norm is not None:
            positive(self, "norm")
        require(self.positions in POSITIONS, f"--positions must be one of {', '.join(POSITIONS)}, got {self.positions!r}")
        require(self.norm_stat in NORM_STATS, f"--norm-stat must be mean_norm or rms_norm, got {self.norm_stat!r}")

    def check_inputs(self) -> None:
        """Every named input exists (or is a hub id): called before any model or evaluator work."""
        require(bool(self.site), "--site is required (e.g. --site blocks.3.resid_post; `innards sites` lists them)")
        require(bool(self.vector), "--vector is required")
        check_vector_spec(self.vector)
        p = prompts_path(self.prompts)
        require(p.is_file(), f"prompts file not found: {p}")
        require(self.acts is None or Path(self.acts).is_dir(), f"--acts: activation store not found: {self.acts}")
        self.glp.check()


def check_vector_spec(spec: str) -> None:
    """A vector file that exists, or ``sae:SAE:LATENT`` with an integer latent (the SAE is checked when loaded)."""
    if spec.startswith("sae:"):
        sae, _, idx = spec[len("sae:"):].rpartition(":")
        require(bool(sae) and idx.lstrip("-").isdigit(), f"SAE decoder rows are written sae:SAE:LATENT, got '{spec}'")
        return
    path, _, row = spec.partition("#")
    require(not row or row.lstrip("-").isdigit(), f"row selector must be an integer: '{spec}'")
    require(Path(path).is_file(), f"steering vector not found: {path}")


# flat spellings of innards 0.1, kept working on the steering commands
GENERATION_ALIASES = {f"--{k}": f"--generation.{k}" for k in
                      ("max-new-tokens", "temperature", "top-k", "top-p", "seed", "batch-size")}
PROJECTION_ALIASES = {f"--{k}": f"--project.{k}" for k in ("t-start", "steps", "schedule", "solver")}
STEER_ALIASES = {**MODEL_ALIASES, "--dtype": "--model.dtype", **GENERATION_ALIASES, **PROJECTION_ALIASES,
                 "--glp": "--glp.path", "--glp-revision": "--glp.revision", "--checkpoint": "--glp.checkpoint",
                 "--restats": "--glp.restats"}


@dataclass
class PriorConfig:
    """Prior-guided steering: gradient steps that add the offset while the GLP's score pulls towards typical activations."""

    weight: float = 0.5
    """pull towards the meta-model's denoised estimate per step (0 = raw addition, 1 = full denoising each step)"""
    steps: int = 4
    """gradient steps (one meta-model evaluation each); the offset is added in equal parts"""
    t: float = 0.3
    """noise level at which the score is read off the velocity field"""

    FLAG_PREFIX = "prior"

    def __post_init__(self) -> None:
        within(self, "weight", 0.0, 1.0)
        at_least(self, 1, "steps")
        within(self, "t", 0.0, 1.0, open_lo=True, open_hi=True)

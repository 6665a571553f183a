"""The one registry of synthesizer kinds: what each kind is, declared once.

The spec (:mod:`synthfactory.spec`: which kinds a dataset may name), the engine
(:mod:`synthfactory.synthesize.engine`: how a kind is built, trained and placed on a device) and the DP
wrapper (:mod:`synthfactory.synthesize.dp`: which smartnoise mechanism) all read :data:`REGISTRY`.
Adding a kind is one entry here plus its factory in the engine. This module imports nothing heavy (no
SDV, torch or smartnoise), so the spec and the Airflow layer can read it cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Family = Literal["sdv", "dp", "argn", "cart"]

__all__ = [
    "ARGN",
    "DP",
    "GPU_CAPABLE",
    "KINDS",
    "NEURAL",
    "REGISTRY",
    "RELATIONAL_CHILD_KINDS",
    "SINGLE_TABLE",
    "SynthesizerKind",
    "foreign_params",
    "get",
]


@dataclass(frozen=True)
class SynthesizerKind:
    """One synthesizer kind.

    * ``family``: ``sdv`` (an SDV synthesizer class, ``sdv_class``), ``dp`` (smartnoise through
      :class:`~synthfactory.synthesize.dp.DPSynthesizer`, mechanism ``dp_mechanism``), ``argn``
      (mostlyai-engine in its own interpreter, :mod:`synthfactory.synthesize.argn`) or ``cart``
      (sequential CART synthesis, synthpop's method, :mod:`synthfactory.synthesize.cart`);
    * ``single_table``: a kind a dataset spec names as ``synthesizer.kind`` (one patient table);
      the others (``hma``, ``par``) are engines of relational mode;
    * ``neural``: trained in epochs through :mod:`synthfactory.synthesize.training` (GPU queue);
    * ``device_param``: the constructor argument that puts it on CUDA (``enable_gpu``, ``cuda``);
      set exactly for the GPU-capable kinds.
    """

    name: str
    family: Family
    single_table: bool = True
    neural: bool = False
    device_param: str | None = None
    sdv_class: str | None = None      # "module.Class" under sdv, e.g. "single_table.CTGANSynthesizer"
    dp_mechanism: str | None = None   # smartnoise-synth's synthesizer name
    params: frozenset[str] = frozenset()  # the keyword arguments ``synthesizer.params`` may give this kind

    @property
    def gpu_capable(self) -> bool:
        """Uses a CUDA device when the worker has one."""
        return self.device_param is not None


# keyword arguments per kind (SDV 1.x constructors, smartnoise-synth's MST/AIM, our wrappers)
_SDV = ("enforce_min_max_values", "enforce_rounding", "locales")
_GAN = ("embedding_dim", "generator_dim", "discriminator_dim", "generator_lr", "generator_decay", "discriminator_lr",
        "discriminator_decay", "batch_size", "discriminator_steps", "log_frequency", "verbose", "epochs", "pac",
        "enable_gpu")
_COPULA = ("numerical_distributions", "default_distribution")
_DP = ("epsilon", "delta", "preprocessor_epsilon", "bins", "bounds")  # DPSynthesizer's own (spec: synthesizer.dp)

REGISTRY: tuple[SynthesizerKind, ...] = (
    SynthesizerKind("gaussian_copula", "sdv", sdv_class="single_table.GaussianCopulaSynthesizer",
                    params=frozenset(_SDV + _COPULA)),
    SynthesizerKind("cart", "cart", params=frozenset(("min_leaf", "max_depth", "smooth", "smooth_scale",
                                                      "visit_sequence", "seed"))),
    SynthesizerKind("ctgan", "sdv", neural=True, device_param="enable_gpu",
                    sdv_class="single_table.CTGANSynthesizer", params=frozenset(_SDV + _GAN)),
    SynthesizerKind("tvae", "sdv", neural=True, device_param="enable_gpu", sdv_class="single_table.TVAESynthesizer",
                    params=frozenset(("enforce_min_max_values", "enforce_rounding", "embedding_dim", "compress_dims",
                                      "decompress_dims", "l2scale", "batch_size", "verbose", "epochs", "loss_factor",
                                      "enable_gpu"))),
    SynthesizerKind("copulagan", "sdv", neural=True, device_param="enable_gpu",
                    sdv_class="single_table.CopulaGANSynthesizer", params=frozenset(_SDV + _GAN + _COPULA)),
    SynthesizerKind("dp_mst", "dp", dp_mechanism="mst", params=frozenset(_DP + ("verbose",))),
    SynthesizerKind("dp_aim", "dp", dp_mechanism="aim",
                    params=frozenset(_DP + ("max_model_size", "degree", "num_marginals", "max_cells", "rounds",
                                            "verbose"))),
    SynthesizerKind("tabular_argn", "argn", params=frozenset(("python", "epochs", "max_minutes", "batch_size", "seed",
                                                              "device", "model", "value_protection",
                                                              "sample_batch_size", "timeout_s"))),
    SynthesizerKind("hma", "sdv", single_table=False, sdv_class="multi_table.HMASynthesizer"),
    SynthesizerKind("par", "sdv", single_table=False, device_param="cuda", sdv_class="sequential.PARSynthesizer"),
)

_BY_NAME = {k.name: k for k in REGISTRY}


def foreign_params(kind: str, params: "dict | list") -> list[str]:
    """``params`` names this kind does not take, each with the kinds that do, e.g.
    ``"default_distribution (a parameter of gaussian_copula, copulagan)"``; ``[]`` when all fit."""
    entry = _BY_NAME.get(kind)
    if entry is None or not entry.params:
        return []
    out = []
    for name in params:
        if name in entry.params:
            continue
        owners = [k.name for k in REGISTRY if name in k.params]
        out.append(f"{name} (a parameter of {', '.join(owners)})" if owners else f"{name} (no kind takes it)")
    return out


def get(name: str) -> SynthesizerKind | None:
    """The registry entry of ``name`` (None: not a kind)."""
    return _BY_NAME.get(name)


#: every kind, in registry order
KINDS: tuple[str, ...] = tuple(k.name for k in REGISTRY)
#: the kinds a dataset spec names as ``synthesizer.kind``
SINGLE_TABLE: tuple[str, ...] = tuple(k.name for k in REGISTRY if k.single_table)
#: child models of relational mode: cart (the default: drawn given the patient's context) and the single-table
#: SDV kinds
RELATIONAL_CHILD_KINDS: tuple[str, ...] = ("cart",) + tuple(k.name for k in REGISTRY
                                                           if k.single_table and k.family == "sdv")
NEURAL: frozenset[str] = frozenset(k.name for k in REGISTRY if k.neural)
DP: frozenset[str] = frozenset(k.name for k in REGISTRY if k.family == "dp")
GPU_CAPABLE: frozenset[str] = frozenset(k.name for k in REGISTRY if k.gpu_capable)
#: the one kind of the argn family (mostlyai-engine TabularARGN)
ARGN: str = next(k.name for k in REGISTRY if k.family == "argn")

"""Resumable, observable training of SDV's neural synthesizers (CTGAN, TVAE, CopulaGAN).

Why not just call ``synth.fit``: ctgan 0.12's ``CTGAN.fit`` / ``TVAE.fit`` build a fresh
``DataTransformer``, generator, discriminator (encoder/decoder) and Adam optimisers on *every* call,
so a second ``fit`` re-initialises instead of continuing, and a retried Airflow task would start from
epoch 0. Here the SDV synthesizer keeps its own preprocessing (``synth.fit`` runs as usual), but its
``_fit`` hands the processed table to :class:`ResumableCTGAN` / :class:`ResumableTVAE`, which run the
*same* training step as ctgan (copied from ctgan 0.12.1, unchanged maths) one epoch at a time and:

* log ``epoch=i/N loss_g=.. loss_d=.. eta=..s`` (TVAE: ``loss=..``) to the task log;
* stop at ``time_budget_s`` (the model trained so far is kept and the shortfall recorded);
* every ``checkpoint_every`` epochs write a checkpoint to staging: ``base.pkl`` once (the fitted SDV
  synthesizer with its transformers and the encoded training matrix) and ``state.pt`` each time (network
  weights, optimiser moments, loss history, epoch counter, torch/numpy RNG states, all CPU-mapped);
* on a retry with the same fingerprint (data, kind, parameters) resume from the last checkpoint and run
  only the remaining epochs. On CPU the resumed run is bit-identical to an uninterrupted one (the tests
  check the weights), because the encoded matrix and the RNG states are restored, not recomputed.

When training ends the synthesizer and its ctgan model get their plain SDV/ctgan classes back, so the
saved model loads with nothing but SDV installed.
"""

from __future__ import annotations

import io
import logging
import pickle
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

TRAINING_ONLY = ("_sf_plan", "_sf_train", "_sf_discriminator", "_sf_opt_g", "_sf_opt_d", "_sf_encoder", "_sf_opt",
                 "_sf_epochs_done", "_sf_elapsed", "_sf_cpu")


@dataclass
class TrainPlan:
    """How to train: total epochs, checkpointing, time budget. ``store``/``checkpoint_uri`` None = no checkpoints."""

    epochs: int
    checkpoint_uri: str | None = None
    store: Any = None
    checkpoint_every: int = 10
    time_budget_s: float | None = None
    fingerprint: str = ""
    seed: int | None = 0
    log_every: int | None = None                 # epochs between progress lines; None = about 20 lines per fit
    on_checkpoint: Callable[[int], None] | None = None  # tests: simulate a killed worker after a checkpoint
    info: dict = field(default_factory=dict)     # filled in: epochs_done, resumed_from_epoch, seconds, ...

    @property
    def checkpointing(self) -> bool:
        return bool(self.checkpoint_uri and self.store is not None and self.checkpoint_every > 0)


class TrainingInterrupted(RuntimeError):
    """Raised by ``on_checkpoint`` hooks in tests to simulate a worker dying after a checkpoint."""


# -- helpers ---------------------------------------------------------------------------------------
def _rng_state() -> dict:
    import torch

    state = {"numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    import torch

    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        try:
            torch.cuda.set_rng_state_all(state["cuda"])
        except RuntimeError:  # a different number of GPUs: the CPU streams are still restored
            log.warning("checkpoint CUDA RNG state does not match this machine's GPUs; not restored")


def _optimizer_to(opt: Any, device: Any) -> None:
    import torch

    for st in opt.state.values():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                st[k] = v.to(device)


def _cpu_state_dict(module: Any) -> dict:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def _cpu_optimizer_state(opt: Any) -> dict:
    import torch

    sd = opt.state_dict()
    return {"state": {k: {n: (t.detach().cpu().clone() if isinstance(t, torch.Tensor) else t) for n, t in v.items()}
                      for k, v in sd["state"].items()},
            "param_groups": sd["param_groups"]}


def _checkpoint_paths(plan: TrainPlan) -> tuple[str, str]:
    from synthfactory.storage import join

    return join(plan.checkpoint_uri, "base.pkl"), join(plan.checkpoint_uri, "state.pt")


class _ProgressMixin:
    """Epoch loop shared by the CTGAN and TVAE variants: progress lines, time budget, checkpoints."""

    _sf_plan: TrainPlan

    def _sf_loop(self, owner: Any, start_epoch: int) -> None:
        import torch

        plan = self._sf_plan
        total = plan.epochs
        every = plan.log_every or max(1, total // 20)
        t0 = time.perf_counter()
        c0 = time.process_time()
        base_elapsed = getattr(self, "_sf_elapsed", 0.0)
        done = start_epoch
        stopped = None
        for epoch in range(start_epoch, total):
            losses = self._sf_epoch(epoch)
            done = epoch + 1
            self._sf_epochs_done = done
            elapsed = base_elapsed + time.perf_counter() - t0
            self._sf_elapsed = elapsed
            run_epochs = done - start_epoch
            eta = (time.perf_counter() - t0) / run_epochs * (total - done)
            if done == 1 or done == total or done % every == 0:
                log.info("epoch=%d/%d %s eta=%.0fs device=%s", done, total,
                         " ".join(f"{k}={v:.4f}" for k, v in losses.items()), eta, self._device)
            budget_hit = plan.time_budget_s is not None and elapsed >= plan.time_budget_s and done < total
            if plan.checkpointing and (done % plan.checkpoint_every == 0 or budget_hit) and done < total:
                self._sf_save_checkpoint(owner, done)
                if plan.on_checkpoint is not None:
                    plan.on_checkpoint(done)
            if budget_hit:
                stopped = "time_budget"
                log.warning("time budget %.0fs reached after epoch %d/%d; keeping the model trained so far",
                            plan.time_budget_s, done, total)
                break
        wall = time.perf_counter() - t0
        cpu = time.process_time() - c0
        run_epochs = max(1, done - start_epoch)
        plan.info.update({
            "epochs_target": total, "epochs_done": done, "resumed_from_epoch": start_epoch or None,
            "stopped": stopped, "device": str(self._device),
            "train_seconds": round(wall, 3), "seconds_per_epoch": round(wall / run_epochs, 4),
            "cpu_seconds_per_epoch": round(cpu / run_epochs, 4),
            "losses_last": {k: round(float(v), 4) for k, v in (self._sf_last or {}).items()},
        })
        if torch.cuda.is_available() and str(self._device).startswith("cuda"):
            plan.info["gpu_name"] = torch.cuda.get_device_name(0)

    # -- checkpoints ---------------------------------------------------------------------------
    def _sf_continue(self, state: dict, owner: Any) -> None:
        """After the weights of a checkpoint: its loss history, elapsed time and RNG state, then the
        remaining epochs."""
        self.loss_values = state["loss_values"]
        self._sf_elapsed = state.get("elapsed", 0.0)
        _set_rng_state(state["rng"])
        self._sf_loop(owner, int(state["epochs_done"]))

    def _sf_train_cpu(self) -> np.ndarray:
        return self._sf_train

    def _sf_save_checkpoint(self, owner: Any, epochs_done: int) -> None:
        import torch

        plan = self._sf_plan
        base_uri, state_uri = _checkpoint_paths(plan)
        if not getattr(self, "_sf_base_written", False):
            import cloudpickle

            buf = io.BytesIO()
            owner_plan = owner.__dict__.pop("_sf_plan", None)  # the plan holds the store (an S3 client) and hooks
            try:
                cloudpickle.dump({"fingerprint": plan.fingerprint, "synthesizer": owner,
                                  "train": self._sf_train_cpu()}, buf)
            finally:
                if owner_plan is not None:
                    owner._sf_plan = owner_plan
            plan.store.write_bytes(base_uri, buf.getvalue())
            self._sf_base_written = True
        buf = io.BytesIO()
        torch.save({"fingerprint": plan.fingerprint, "epochs_done": epochs_done, "rng": _rng_state(),
                    "elapsed": getattr(self, "_sf_elapsed", 0.0), "loss_values": self.loss_values,
                    **self._sf_weights()}, buf)
        plan.store.write_bytes(state_uri, buf.getvalue())  # atomic per file (local: rename; s3: one PUT)
        log.info("checkpoint epoch=%d/%d written to %s", epochs_done, plan.epochs, plan.checkpoint_uri)

    def __getstate__(self) -> dict:
        """Pickle without the training-only state, with the networks on CPU (loads on any machine)."""
        import copy

        state = {k: v for k, v in self.__dict__.items() if k not in TRAINING_ONLY and k != "_sf_base_written"}
        for name in ("_generator", "decoder"):
            if state.get(name) is not None:
                state[name] = copy.deepcopy(state[name]).cpu()
        import torch

        state["_device"] = torch.device("cpu")
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__ = state


# -- CTGAN -----------------------------------------------------------------------------------------
def _ctgan_classes() -> tuple[Any, Any, Any, Any, Any]:
    from ctgan.data_sampler import DataSampler
    from ctgan.data_transformer import DataTransformer
    from ctgan.synthesizers.ctgan import CTGAN, Discriminator, Generator

    return CTGAN, Discriminator, Generator, DataSampler, DataTransformer


def _make_resumable_ctgan() -> type:
    CTGAN, Discriminator, Generator, DataSampler, DataTransformer = _ctgan_classes()

    class ResumableCTGAN(_ProgressMixin, CTGAN):
        """ctgan's CTGAN with the training loop split into epochs (maths unchanged, see module docstring)."""

        _sf_last: dict | None = None

        def sf_fit(self, train_data: pd.DataFrame, discrete_columns: list, owner: Any) -> None:
            from torch import optim

            self._validate_discrete_columns(train_data, discrete_columns)
            self._validate_null_data(train_data, discrete_columns)
            self._transformer = DataTransformer()
            self._transformer.fit(train_data, discrete_columns)
            train = self._transformer.transform(train_data)
            self._data_sampler = DataSampler(train, self._transformer.output_info_list, self._log_frequency)
            self._sf_train = train
            data_dim = self._transformer.output_dimensions
            self._generator = Generator(self._embedding_dim + self._data_sampler.dim_cond_vec(),
                                        self._generator_dim, data_dim).to(self._device)
            self._sf_discriminator = Discriminator(data_dim + self._data_sampler.dim_cond_vec(),
                                                   self._discriminator_dim, pac=self.pac).to(self._device)
            self._sf_opt_g = optim.Adam(self._generator.parameters(), lr=self._generator_lr, betas=(0.5, 0.9),
                                        weight_decay=self._generator_decay)
            self._sf_opt_d = optim.Adam(self._sf_discriminator.parameters(), lr=self._discriminator_lr,
                                        betas=(0.5, 0.9), weight_decay=self._discriminator_decay)
            self.loss_values = pd.DataFrame(columns=["Epoch", "Generator Loss", "Discriminator Loss"])
            self._sf_loop(owner, 0)

        def sf_resume(self, state: dict, train: np.ndarray, owner: Any) -> None:
            from torch import optim

            self._sf_train = train
            data_dim = self._transformer.output_dimensions
            self._generator.to(self._device)
            self._sf_discriminator = Discriminator(data_dim + self._data_sampler.dim_cond_vec(),
                                                   self._discriminator_dim, pac=self.pac).to(self._device)
            self._generator.load_state_dict(state["generator"])
            self._sf_discriminator.load_state_dict(state["discriminator"])
            self._sf_opt_g = optim.Adam(self._generator.parameters(), lr=self._generator_lr, betas=(0.5, 0.9),
                                        weight_decay=self._generator_decay)
            self._sf_opt_d = optim.Adam(self._sf_discriminator.parameters(), lr=self._discriminator_lr,
                                        betas=(0.5, 0.9), weight_decay=self._discriminator_decay)
            self._sf_opt_g.load_state_dict(state["opt_g"])
            self._sf_opt_d.load_state_dict(state["opt_d"])
            _optimizer_to(self._sf_opt_g, self._device)
            _optimizer_to(self._sf_opt_d, self._device)
            self._sf_continue(state, owner)

        def _sf_weights(self) -> dict:
            return {"generator": _cpu_state_dict(self._generator),
                    "discriminator": _cpu_state_dict(self._sf_discriminator),
                    "opt_g": _cpu_optimizer_state(self._sf_opt_g), "opt_d": _cpu_optimizer_state(self._sf_opt_d)}

        def _sf_epoch(self, i: int) -> dict:
            # ctgan 0.12.1 CTGAN.fit, body of ``for i in epoch_iterator`` (unchanged maths)
            import torch

            train_data = self._sf_train
            discriminator = self._sf_discriminator
            optimizerG, optimizerD = self._sf_opt_g, self._sf_opt_d
            mean = torch.zeros(self._batch_size, self._embedding_dim, device=self._device)
            std = mean + 1
            steps_per_epoch = max(len(train_data) // self._batch_size, 1)
            for _ in range(steps_per_epoch):
                for _n in range(self._discriminator_steps):
                    fakez = torch.normal(mean=mean, std=std)
                    condvec = self._data_sampler.sample_condvec(self._batch_size)
                    if condvec is None:
                        c1, m1, col, opt = None, None, None, None
                        real = self._data_sampler.sample_data(train_data, self._batch_size, col, opt)
                    else:
                        c1, m1, col, opt = condvec
                        c1 = torch.from_numpy(c1).to(self._device)
                        m1 = torch.from_numpy(m1).to(self._device)
                        fakez = torch.cat([fakez, c1], dim=1)
                        perm = np.arange(self._batch_size)
                        np.random.shuffle(perm)
                        real = self._data_sampler.sample_data(train_data, self._batch_size, col[perm], opt[perm])
                        c2 = c1[perm]
                    fake = self._generator(fakez)
                    fakeact = self._apply_activate(fake)
                    real = torch.from_numpy(real.astype("float32")).to(self._device)
                    if c1 is not None:
                        fake_cat = torch.cat([fakeact, c1], dim=1)
                        real_cat = torch.cat([real, c2], dim=1)
                    else:
                        real_cat = real
                        fake_cat = fakeact
                    y_fake = discriminator(fake_cat)
                    y_real = discriminator(real_cat)
                    pen = discriminator.calc_gradient_penalty(real_cat, fake_cat, self._device, self.pac)
                    loss_d = -(torch.mean(y_real) - torch.mean(y_fake))
                    optimizerD.zero_grad(set_to_none=False)
                    pen.backward(retain_graph=True)
                    loss_d.backward()
                    optimizerD.step()

                fakez = torch.normal(mean=mean, std=std)
                condvec = self._data_sampler.sample_condvec(self._batch_size)
                if condvec is None:
                    c1, m1, col, opt = None, None, None, None
                else:
                    c1, m1, col, opt = condvec
                    c1 = torch.from_numpy(c1).to(self._device)
                    m1 = torch.from_numpy(m1).to(self._device)
                    fakez = torch.cat([fakez, c1], dim=1)
                fake = self._generator(fakez)
                fakeact = self._apply_activate(fake)
                if c1 is not None:
                    y_fake = discriminator(torch.cat([fakeact, c1], dim=1))
                else:
                    y_fake = discriminator(fakeact)
                cross_entropy = 0 if condvec is None else self._cond_loss(fake, c1, m1)
                loss_g = -torch.mean(y_fake) + cross_entropy
                optimizerG.zero_grad(set_to_none=False)
                loss_g.backward()
                optimizerG.step()

            generator_loss = loss_g.detach().cpu().item()
            discriminator_loss = loss_d.detach().cpu().item()
            row = pd.DataFrame({"Epoch": [i], "Generator Loss": [generator_loss],
                                "Discriminator Loss": [discriminator_loss]})
            self.loss_values = row if self.loss_values.empty else pd.concat([self.loss_values, row]).reset_index(
                drop=True)
            self._sf_last = {"loss_g": generator_loss, "loss_d": discriminator_loss}
            return self._sf_last

    ResumableCTGAN.__module__ = __name__
    ResumableCTGAN.__qualname__ = "ResumableCTGAN"
    return ResumableCTGAN


# -- TVAE ------------------------------------------------------------------------------------------
def _make_resumable_tvae() -> type:
    from ctgan.data_transformer import DataTransformer
    from ctgan.synthesizers.tvae import TVAE, Decoder, Encoder, _loss_function

    class ResumableTVAE(_ProgressMixin, TVAE):
        """ctgan's TVAE with the training loop split into epochs (maths unchanged)."""

        _sf_last: dict | None = None

        def _sf_setup(self, train: np.ndarray) -> None:
            import torch
            from torch.optim import Adam
            from torch.utils.data import DataLoader, TensorDataset

            self._sf_train = train
            dataset = TensorDataset(torch.from_numpy(train.astype("float32")).to(self._device))
            self._sf_loader = DataLoader(dataset, batch_size=self.batch_size, shuffle=True, drop_last=False)
            data_dim = self.transformer.output_dimensions
            self._sf_encoder = Encoder(data_dim, self.compress_dims, self.embedding_dim).to(self._device)
            if getattr(self, "decoder", None) is None:
                self.decoder = Decoder(self.embedding_dim, self.decompress_dims, data_dim)
            self.decoder.to(self._device)
            self._sf_opt = Adam(list(self._sf_encoder.parameters()) + list(self.decoder.parameters()),
                                weight_decay=self.l2scale)

        def sf_fit(self, train_data: pd.DataFrame, discrete_columns: list, owner: Any) -> None:
            self.transformer = DataTransformer()
            self.transformer.fit(train_data, discrete_columns)
            self.decoder = None
            self._sf_setup(self.transformer.transform(train_data))
            self.loss_values = pd.DataFrame(columns=["Epoch", "Batch", "Loss"])
            self._sf_loop(owner, 0)

        def sf_resume(self, state: dict, train: np.ndarray, owner: Any) -> None:
            self._sf_setup(train)
            self._sf_encoder.load_state_dict(state["encoder"])
            self.decoder.load_state_dict(state["decoder"])
            self._sf_opt.load_state_dict(state["opt"])
            _optimizer_to(self._sf_opt, self._device)
            self._sf_continue(state, owner)

        def _sf_weights(self) -> dict:
            return {"encoder": _cpu_state_dict(self._sf_encoder), "decoder": _cpu_state_dict(self.decoder),
                    "opt": _cpu_optimizer_state(self._sf_opt)}

        def _sf_epoch(self, i: int) -> dict:
            # ctgan 0.12.1 TVAE.fit, body of ``for i in iterator`` (unchanged maths)
            encoder, optimizerAE = self._sf_encoder, self._sf_opt
            losses, batch = [], []
            for id_, data in enumerate(self._sf_loader):
                optimizerAE.zero_grad()
                real = data[0].to(self._device)
                mu, std, logvar = encoder(real)
                import torch

                eps = torch.randn_like(std)
                emb = eps * std + mu
                rec, sigmas = self.decoder(emb)
                loss_1, loss_2 = _loss_function(rec, real, sigmas, mu, logvar, self.transformer.output_info_list,
                                                self.loss_factor)
                loss = loss_1 + loss_2
                loss.backward()
                optimizerAE.step()
                self.decoder.sigma.data.clamp_(0.01, 1.0)
                batch.append(id_)
                losses.append(loss.detach().cpu().item())
            row = pd.DataFrame({"Epoch": [i] * len(batch), "Batch": batch, "Loss": losses})
            self.loss_values = row if self.loss_values.empty else pd.concat([self.loss_values, row]).reset_index(
                drop=True)
            self._sf_last = {"loss": losses[-1] if losses else float("nan")}
            return self._sf_last

        def __getstate__(self) -> dict:
            state = super().__getstate__()
            state.pop("_sf_loader", None)
            return state

    ResumableTVAE.__module__ = __name__
    ResumableTVAE.__qualname__ = "ResumableTVAE"
    return ResumableTVAE


_CLASSES: dict[str, type] = {}


def resumable_model_class(name: str) -> type:
    if name not in _CLASSES:
        _CLASSES[name] = _make_resumable_ctgan() if name == "ctgan" else _make_resumable_tvae()
    return _CLASSES[name]


def __getattr__(name: str) -> Any:  # pickles made mid-training refer to training.ResumableCTGAN / ResumableTVAE
    if name == "ResumableCTGAN":
        return resumable_model_class("ctgan")
    if name == "ResumableTVAE":
        return resumable_model_class("tvae")
    raise AttributeError(name)


# -- SDV side --------------------------------------------------------------------------------------
def _sdv_fit_hook(synth: Any, processed_data: pd.DataFrame, model_name: str) -> None:
    """What ``CTGANSynthesizer._fit`` / ``TVAESynthesizer._fit`` do, with the resumable model class."""
    from sdv.single_table.ctgan import _validate_no_category_dtype
    from sdv.single_table.utils import detect_discrete_columns

    _validate_no_category_dtype(processed_data)
    transformers = synth._data_processor._hyper_transformer.field_transformers
    discrete_columns = detect_discrete_columns(synth.metadata, processed_data, transformers)
    model = resumable_model_class(model_name)(**synth._model_kwargs)
    model._sf_plan = synth._sf_plan
    synth._model = model
    model.sf_fit(processed_data, discrete_columns, owner=synth)


def _copulagan_normalise(synth: Any, processed_data: pd.DataFrame) -> pd.DataFrame:
    """What ``CopulaGANSynthesizer._fit`` does before handing over to CTGAN."""
    import rdt
    from sdv.single_table.copulagan import warn_missing_numerical_distributions

    warn_missing_numerical_distributions(synth.numerical_distributions, processed_data.columns)
    config = synth._create_gaussian_normalizer_config(processed_data)
    synth._gaussian_normalizer_hyper_transformer = rdt.HyperTransformer()
    synth._gaussian_normalizer_hyper_transformer.set_config(config)
    return synth._gaussian_normalizer_hyper_transformer.fit_transform(processed_data)


def _install_hook(synth: Any, kind: str, plan: TrainPlan) -> type:
    """Give ``synth`` a subclass whose ``_fit`` trains resumably; returns the original class."""
    original = type(synth)
    model_name = "tvae" if kind == "tvae" else "ctgan"

    def _fit(self: Any, processed_data: pd.DataFrame) -> None:
        if kind == "copulagan":
            processed_data = _copulagan_normalise(self, processed_data)
        _sdv_fit_hook(self, processed_data, model_name)

    hooked = type(f"Resumable{original.__name__}", (original,), {"_fit": _fit})
    synth.__class__ = hooked
    synth._sf_plan = plan
    return original


def _restore_classes(synth: Any, original: type, kind: str) -> None:
    from ctgan import CTGAN, TVAE

    synth.__class__ = original
    synth.__dict__.pop("_sf_plan", None)
    model = getattr(synth, "_model", None)
    if model is not None:
        for attr in (*TRAINING_ONLY, "_sf_loader", "_sf_base_written", "_sf_last"):
            model.__dict__.pop(attr, None)
        model.__class__ = TVAE if kind == "tvae" else CTGAN


def _finish_sdv_fit(synth: Any) -> None:
    """The bookkeeping ``BaseSynthesizer.fit_processed_data`` does after ``_fit`` (for a resumed fit)."""
    import datetime

    from sdv import version

    synth._fitted = True
    synth._fitted_date = datetime.datetime.today().strftime("%Y-%m-%d")
    synth._fitted_sdv_version = getattr(version, "community", None)
    synth._fitted_sdv_enterprise_version = getattr(version, "enterprise", None)


def _load_checkpoint(plan: TrainPlan) -> tuple[Any, dict] | None:
    import torch

    if not plan.checkpointing:
        return None
    base_uri, state_uri = _checkpoint_paths(plan)
    if not (plan.store.exists(base_uri) and plan.store.exists(state_uri)):
        return None
    state = torch.load(io.BytesIO(plan.store.read_bytes(state_uri)), map_location="cpu", weights_only=False)
    if state.get("fingerprint") != plan.fingerprint:
        log.warning("checkpoint at %s is for other data or parameters; training from epoch 0", plan.checkpoint_uri)
        return None
    base = pickle.loads(plan.store.read_bytes(base_uri))
    if base.get("fingerprint") != plan.fingerprint:
        return None
    return base, state


def fit_resumable(synth: Any, data: pd.DataFrame, kind: str, plan: TrainPlan, table: str) -> Any:
    """Fit an SDV CTGAN/TVAE/CopulaGAN synthesizer epoch by epoch; resume from ``plan``'s checkpoint if one
    with the same fingerprint exists. Returns the fitted synthesizer (plain SDV classes) and fills
    ``plan.info``."""
    import torch

    resumed = _load_checkpoint(plan)
    if resumed is not None:
        base, state = resumed
        synth = base["synthesizer"]
        model = synth._model
        original = type(synth).__mro__[1]
        synth._sf_plan = plan
        model._sf_plan = plan
        model._sf_base_written = True
        # the device of *this* worker (a retry may land elsewhere); weights were saved CPU-mapped
        from synthfactory.synthesize.device import detect_device

        model._device = torch.device(detect_device(log_warning=False))
        log.info("resuming %s training from checkpoint epoch=%d/%d", kind, state["epochs_done"], plan.epochs)
        model.sf_resume(state, base["train"], owner=synth)
        _finish_sdv_fit(synth)
    else:
        if plan.seed is not None:
            np.random.seed(plan.seed)
            torch.manual_seed(plan.seed)
        original = _install_hook(synth, kind, plan)
        synth.fit({table: data})
    _restore_classes(synth, original, kind)
    if plan.checkpointing:
        plan.store.remove_tree(plan.checkpoint_uri)  # done: a later retry of fit starts from the saved model
    return synth

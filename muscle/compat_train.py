"""MUSCLE compatibility training (paper Sec. 4.1, Eq. 1-2), from the cache or with live teachers.

The compatibility adapter starts as a copy of the v2 task adapter and is trained on the v2 base
with the masked KL of :func:`muscle.losses.masked_kl`: toward v1 on tokens the adapter gets
wrong, toward v2 elsewhere.

Same loop as task training (:func:`muscle.loop.fit`) through the same recipe
(:func:`muscle.recipe.run_recipe`), another objective and another source of batches.

* Cache mode (:func:`train_compat_from_cache`): teachers come from ``muscle-cache build``; only
  the v2 base and the one adapter being trained are in memory, no teacher runs a forward pass.
* Online mode (:func:`train_compat_online`): v1 and v2 task models run live, their top-K taken
  on the fly with the same K and the same loss. It is the baseline the cache must beat, and the
  choice for users without disk.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch

from muscle import MuscleError, distributed
from muscle.config import (
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_K,
    CompatConfig,
    DataConfig,
    ModelSpec,
    TrainConfig,
    to_dict,
)
from muscle.data import encode_splits, load_splits, model_max_length, num_batches
from muscle.fingerprints import describe_model, tokenizer_fingerprint
from muscle.forward import Batch, empty_batch_loss, labelled, logits_at, student_logits, valid_rows
from muscle.loop import Batches
from muscle.masks import ALL_MASKS, STUDENT_MASKS
from muscle.models import load_adapter, load_base, load_model, load_tokenizer
from muscle.recipe import TrainingSetup, TrainResult, adapter_sidecar, run_recipe, setup_devices
from muscle.run_dir import train_identity
from muscle.tasks import dataset_fingerprint, get_task

# One result type for every training command; the old name, for one release.
CompatResult = TrainResult


def _stats_dict(stats) -> dict[str, float]:
    raw = stats if isinstance(stats, dict) else vars(stats)
    return {k: float(v) for k, v in raw.items()}


class CompatObjective:
    """The MUSCLE loss on a batch that carries both teachers' top-K (from the cache or live).

    Batch keys: input_ids, attention_mask, labels (B, T); v1_ids, v2_ids (B, T, K);
    v1_logprobs, v2_logprobs (B, T, K) at the training temperature; v1_label_logprob,
    v2_label_logprob (B, T) at T = 1 (for the likelihood masks). A teacher from a format 2
    cache also has <t>_tail_ids, <t>_tail_logweights (B, T, M) and <t>_negent (B, T) at the
    training temperature: its sampled tail, used whenever present (:func:`_sampled_tails`).
    """

    name = "compat"

    def __init__(self, cfg: CompatConfig):
        if cfg.mask not in ALL_MASKS:
            raise MuscleError(f"unknown mask {cfg.mask!r}: choose one of {', '.join(ALL_MASKS)}")
        self.cfg = cfg
        self._estimator_shown: str | None = None  # the loss estimator last announced
        self._fused: bool | None = None  # fused LM head + loss? decided on the first batch

    def mask_for(self, batch: Batch, rows: torch.Tensor):
        """The kernel's own mask name, or a bool tensor (n,) for the likelihood masks."""
        if self.cfg.mask in STUDENT_MASKS:
            return self.cfg.mask
        from muscle.losses import sequence_likelihood_mask, token_likelihood_mask

        lp1 = batch["v1_label_logprob"].reshape(-1).index_select(0, rows)  # (n,)
        lp2 = batch["v2_label_logprob"].reshape(-1).index_select(0, rows)  # (n,)
        if self.cfg.mask == "token_ll":
            return token_likelihood_mask(lp1, lp2)
        example = rows // batch["labels"].shape[1]  # (n,) which sequence each row belongs to
        return sequence_likelihood_mask(
            lp1, lp2, example, torch.ones_like(example, dtype=torch.bool)
        )

    def __call__(self, model, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        from muscle.losses import masked_kl_with_stats

        rows = valid_rows(batch)  # (n,)
        if rows.numel() == 0:
            zero = {"loss": 0.0, "kl": 0.0, "ce": 0.0, "frac_v1": 0.0, "n_tokens": 0.0}
            zero["frac_sampled"] = 0.0
            return empty_batch_loss(model, batch), zero
        labels = batch["labels"].reshape(-1).index_select(0, rows)  # (n,)

        def take(key: str) -> torch.Tensor:  # (B, T, K) -> (n, K)
            t = batch[key]
            return t.reshape(-1, t.shape[-1]).index_select(0, rows)

        v1_tail, v2_tail = _sampled_tails(batch, rows, take)
        teachers = (take("v1_ids"), take("v1_logprobs"), take("v2_ids"), take("v2_logprobs"))
        options = dict(
            temperature=self.cfg.temperature,
            mask=self.mask_for(batch, rows),
            ce_weight=self.cfg.ce_weight,
            t2_scale=self.cfg.t2_scale,
            impl=self.cfg.impl,
            v1_tail=v1_tail,
            v2_tail=v2_tail,
        )
        if self._use_fused_head(model):
            from muscle.fused_head import fused_linear_masked_kl_with_stats, head_inputs

            hidden, head = head_inputs(model, batch, rows)  # (n, d), the head's (V, d) weight
            loss, stats = fused_linear_masked_kl_with_stats(
                hidden, head.weight, head.bias, labels, *teachers,
                logit_softcap=head.logit_softcap, **options,
            )  # fmt: skip
        else:
            z = student_logits(model, batch)  # (n, V)
            loss, stats = masked_kl_with_stats(z, labels, *teachers, **options)
        self._announce(stats.estimator)
        s = _stats_dict(stats.as_dict())
        return loss, {
            "loss": loss.item(),
            "kl": s.get("kl", math.nan),
            "ce": s.get("ce", math.nan),
            "frac_v1": s.get("frac_v1", math.nan),
            "n_tokens": float(rows.numel()),
            # 1: every token's loss was the sampled-tail estimate (format 2), 0: the K+1 bins
            "frac_sampled": s.get("frac_sampled", 0.0),
        }

    def _use_fused_head(self, model) -> bool:
        """Fused LM head + loss (the (n, V) logits never exist) where the config asks for it
        and the model's head can be reached; else materialized logits. Decided once per run
        and said once, with the reason for a fallback."""
        if self._fused is None:
            why = "off (--no-fused-head)"
            if self.cfg.fused_head:
                from muscle.fused_head import probe_fused_head

                why = probe_fused_head(model)
            self._fused = why is None
            if distributed.dist_info().is_main:
                from tqdm.auto import tqdm

                tqdm.write(
                    "student LM head: fused with the loss (muscle.fused_head)"
                    if self._fused
                    else f"student LM head: materialized logits ({why})"
                )
        return self._fused

    def _announce(self, estimator: str) -> None:
        """Say which estimator the loss is (ESTIMATORS), once, and again if it changes."""
        if estimator == self._estimator_shown or not distributed.dist_info().is_main:
            return
        from tqdm.auto import tqdm

        from muscle.losses import ESTIMATORS

        self._estimator_shown = estimator
        tqdm.write(f"compat loss estimator: {estimator} ({ESTIMATORS[estimator]})")


# ---------------------------------------------------------------- sampled tails (cache format 2)


def _sampled_tails(batch: Batch, rows: torch.Tensor, take) -> tuple:
    """Each teacher's :class:`muscle.losses.SampledTail` on the rows (n,), or None where the
    batch has no tail for it (format 1, online): (v1_tail, v2_tail)."""
    from muscle.losses import SampledTail

    out = []
    for who in ("v1", "v2"):
        if f"{who}_tail_ids" not in batch:
            out.append(None)
            continue
        negent = batch[f"{who}_negent"].reshape(-1).index_select(0, rows)  # (n,)
        out.append(SampledTail(take(f"{who}_tail_ids"), take(f"{who}_tail_logweights"), negent))
    return tuple(out)


# ------------------------------------------------------------------------------ cache mode


def _check_v2_adapter(spec: ModelSpec) -> None:
    if not spec.adapter:
        raise MuscleError(
            "the cache's v2 teacher has no adapter: the compatibility adapter starts from v2's task adapter"
        )
    if not (Path(spec.adapter) / "adapter_config.json").is_file():
        raise MuscleError(
            f"the v2 task adapter recorded in the cache is no longer on disk: {spec.adapter}"
        )


def train_compat_from_cache(
    cache_path: str | Path,
    out_dir: str | Path,
    *,
    train_cfg: TrainConfig = TrainConfig(),
    compat_cfg: CompatConfig = CompatConfig(),
    overwrite: bool = False,
    device: str | None = None,
    deepspeed_config: str | Path | dict | None = None,
    stop_after_steps: int | None = None,
    student_dtype: str | None = None,
) -> TrainResult:
    """``muscle-train --cache``: everything comes from the cache (v2 base + adapter, tokens, teachers).

    ``student_dtype``: the student's weights dtype (``--dtype``); default: the dtype the cache
    recorded for v2. The teachers' numbers are cached, so it may differ from the build's.

    ``deepspeed_config``: train through DeepSpeed (ZeRO 0-2), see :func:`muscle.loop.fit`.
    """
    from muscle.teacher_cache import (
        CacheReader,
        cache_fingerprint,
        cache_teacher_spec,
        check_teacher_provenance,
    )

    devices = setup_devices(device, train_cfg, deepspeed_config)
    reader = CacheReader(cache_path)
    for name in ("v1", "v2"):
        if name not in reader.teachers:
            raise MuscleError(
                f"cache {cache_path} has no teacher {name!r}: build it with "
                f"muscle-cache build --model {name} --out {cache_path} (plus --config or --base/--adapter)"
            )
        reader.check_teacher(name)  # complete, every shard file present
    temps = reader.temperatures
    if not any(abs(compat_cfg.temperature - t) < 1e-9 for t in temps):
        raise MuscleError(
            f"temperature {compat_cfg.temperature} is not cached (cached: {', '.join(map(str, temps))}): "
            "use one of those or rebuild the cache with --temperatures"
        )
    v2_spec = cache_teacher_spec(cache_path, "v2")
    if student_dtype is not None:
        v2_spec = dataclasses.replace(v2_spec, dtype=student_dtype)
    _check_v2_adapter(v2_spec)
    check_teacher_provenance(cache_path, "v2")
    tok = load_tokenizer(v2_spec)
    tok_fp = tokenizer_fingerprint(tok)
    cached_tok = reader.meta.get("tokenizer_fingerprint")
    if cached_tok and cached_tok != tok_fp:
        raise MuscleError(
            f"the student's tokenizer ({tok_fp}) differs from the cache's ({cached_tok})"
        )
    identity = {
        "kind": "compat",
        "mode": "cache",
        # the cache's content, not its path: a moved cache resumes the same run, and a cache
        # rebuilt in place from other teachers or data is a different run (its path is in the
        # adapter's sidecar)
        "cache_id": cache_fingerprint(reader.meta, {n: reader.teachers[n] for n in ("v1", "v2")}),
        "v2": describe_model(v2_spec),
        "student_dtype": v2_spec.dtype,  # a resume in another dtype is refused
        "compat": train_identity(compat_cfg),
        "train": train_identity(train_cfg),
    }

    def build() -> TrainingSetup:
        model = load_model(v2_spec, devices.device, trainable_adapter=True)
        vocab = model.get_output_embeddings().weight.shape[0]
        for name in ("v1", "v2"):
            theirs = reader.teachers[name].get("vocab_size")
            if theirs is not None and int(theirs) != vocab:
                raise MuscleError(
                    f"the student's vocabulary ({vocab}) differs from teacher {name}'s ({theirs})"
                )
        bs, seed, T = train_cfg.batch_size, train_cfg.seed, compat_cfg.temperature
        rank, world = devices.dist.rank, devices.dist.world_size
        batches = Batches(
            train=lambda epoch, skip: reader.iter_batches(
                "train",
                bs,
                temperature=T,
                shuffle=True,
                seed=seed,
                epoch=epoch,
                skip=skip,
                rank=rank,
                world_size=world,
            ),
            validation=lambda: reader.iter_batches("validation", bs, temperature=T, shuffle=False),
            batches_per_epoch=num_batches(reader.num_examples("train"), bs * world),
        )
        sidecar = adapter_sidecar(
            "compat",
            reader.meta.get("task", "?"),
            v2_spec,
            tok_fp,
            mode="cache",
            cache=str(cache_path),
            teachers=reader.teachers,
            # the loss the cache supports: format 2 (a sampled tail) trains the full KL
            loss_estimator="sampled_tail" if reader.tail_samples else "kplus1",
            compat=to_dict(compat_cfg),
            train=to_dict(train_cfg),
        )
        return TrainingSetup(model, CompatObjective(compat_cfg), batches, sidecar)

    return run_recipe(
        out_dir,
        identity,
        build,
        train_cfg=train_cfg,
        devices=devices,
        overwrite=overwrite,
        stop_after_steps=stop_after_steps,
    )


# ------------------------------------------------------------------------------ online mode


class LiveTeachers:
    """Adds both teachers' top-K to a batch by running v1 and v2 now (online mode).

    v2's teacher shares the student's base: its task adapter is loaded as a second, frozen
    adapter ("teacher") on the same PEFT model, so online mode holds two bases (v1, v2), not three.
    """

    def __init__(
        self, v1_model, student, k: int = DEFAULT_TOP_K, temperature: float = DEFAULT_TEMPERATURE
    ):
        self.v1, self.student, self.k, self.T = v1_model, student, k, temperature

    @torch.no_grad()
    def _topk(self, model, batch: Batch, keep, rows, prefix: str, out: Batch) -> None:
        """Top-K of ``model`` at the labelled positions ``keep`` (B, T) / ``rows`` (n,),
        written into (B, T, ...) tensors."""
        from muscle.topk import teacher_topk

        labels = batch["labels"]  # (B, T)
        z = logits_at(model, batch["input_ids"], batch["attention_mask"], keep)  # (n, V)
        tk = teacher_topk(z, labels.reshape(-1)[rows], self.k, temperatures=(self.T, 1.0))
        B, T = labels.shape
        ids = torch.zeros(B, T, self.k, dtype=tk.ids.dtype, device=z.device)
        lp = torch.zeros(B, T, self.k, dtype=torch.float32, device=z.device)
        label_lp = torch.zeros(B, T, dtype=torch.float32, device=z.device)
        ids[keep] = tk.ids
        lp[keep] = tk.logprobs(self.T)  # (n, K) at the training temperature
        label_lp[keep] = tk.label_logprob(1.0)  # (n,) at T = 1, for the likelihood masks
        out[f"{prefix}_ids"], out[f"{prefix}_logprobs"] = ids, lp
        out[f"{prefix}_label_logprob"] = label_lp

    @torch.no_grad()
    def __call__(self, batch: Batch) -> Batch:
        out = dict(batch)
        keep = labelled(batch)  # (B, T)
        rows = valid_rows(batch)  # (n,), the same positions
        self._topk(self.v1, batch, keep, rows, "v1", out)
        was_training = self.student.training
        self.student.eval()
        self.student.set_adapter("teacher")
        try:
            self._topk(self.student, batch, keep, rows, "v2", out)
        finally:
            self.student.set_adapter("default")
            self.student.train(was_training)
        return out


class OnlineCompatObjective(CompatObjective):
    def __init__(self, cfg: CompatConfig, teachers: LiveTeachers):
        super().__init__(cfg)
        self.teachers = teachers

    def __call__(self, model, batch: Batch):
        return super().__call__(model, self.teachers(batch))


def train_compat_online(
    v1: ModelSpec,
    v2: ModelSpec,
    data_cfg: DataConfig,
    out_dir: str | Path,
    *,
    train_cfg: TrainConfig = TrainConfig(),
    compat_cfg: CompatConfig = CompatConfig(),
    top_k: int = DEFAULT_TOP_K,
    overwrite: bool = False,
    device: str | None = None,
    stop_after_steps: int | None = None,
) -> TrainResult:
    """``muscle-train --online``: the same loss with teachers computed live."""
    if not v2.adapter:
        raise MuscleError(
            "online mode needs v2's task adapter (the compatibility adapter starts from it)"
        )
    task = get_task(data_cfg.task)
    tok = load_tokenizer(v2)
    tok_fp = tokenizer_fingerprint(tok)
    if tokenizer_fingerprint(load_tokenizer(v1)) != tok_fp:
        raise MuscleError(
            "v1 and v2 use different tokenizers: MUSCLE's token-level KL needs one vocabulary"
        )
    examples = load_splits(data_cfg)
    identity = {
        "kind": "compat",
        "mode": "online",
        "task": task.name,
        "data": to_dict(data_cfg),
        "dataset_fingerprint": dataset_fingerprint(
            task, examples["train"] + examples["validation"]
        ),
        "v1": describe_model(v1),
        "v2": describe_model(v2),
        "top_k": top_k,
        "compat": train_identity(compat_cfg),
        "train": train_identity(train_cfg),
    }
    devices = setup_devices(device, train_cfg)

    def build() -> TrainingSetup:
        v1_model = load_model(v1, devices.device)
        base = load_base(v2, devices.device)
        student = load_adapter(base, v2.adapter, trainable=True, base_spec=v2.base_only())
        student.load_adapter(v2.adapter, adapter_name="teacher", is_trainable=False)
        student.set_adapter("default")
        student.to(devices.device)
        max_len = data_cfg.max_length or model_max_length(base)
        enc = encode_splits(tok, data_cfg, examples, max_length=max_len)
        batches = Batches.of_examples(
            enc["train"],
            enc["validation"],
            batch_size=train_cfg.batch_size,
            pad_id=tok.pad_token_id,
            seed=train_cfg.seed,
            dist=devices.dist,
        )
        teachers = LiveTeachers(v1_model, student, top_k, compat_cfg.temperature)
        sidecar = adapter_sidecar(
            "compat",
            task.name,
            v2,
            tok_fp,
            mode="online",
            teachers={"v1": identity["v1"], "v2": identity["v2"]},
            top_k=top_k,
            data=to_dict(data_cfg),
            compat=to_dict(compat_cfg),
            train=to_dict(train_cfg),
        )
        return TrainingSetup(student, OnlineCompatObjective(compat_cfg, teachers), batches, sidecar)

    return run_recipe(
        out_dir,
        identity,
        build,
        train_cfg=train_cfg,
        devices=devices,
        overwrite=overwrite,
        stop_after_steps=stop_after_steps,
    )

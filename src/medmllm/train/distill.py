"""Recipe of the `distill` stage (knowledge distillation, the LLaVA-KD idea): setup -> train -> save -> cleanup.

A frozen **teacher** (a saved MedMLLM) teaches a smaller **student** on instruction records. The
student shares the teacher's tokenizer (the logit KL needs one vocabulary) and its tokens per input
(feature matching needs the same placeholder positions); it is built fresh (``student.builder``,
e.g. ``small`` with ``hidden=128, layers=2, encoder_scale=0.5``: about 1/5 of the default model's
parameters) or continued from a saved folder (``student.path``). Per batch, with ``T`` the temperature::

    loss = ce_weight      * CE(student logits, answer tokens)
         + kl_weight      * T^2 * KL(softmax(teacher / T) || softmax(student / T))   on answer tokens
         + feature_weight * MSE(A_f(student modality tokens), teacher modality tokens) / E[teacher^2]
         + hidden_weight  * MSE(A_h(student last hidden state), teacher's)          on answer tokens
                                                                                    / E[teacher^2]

``A_f``, ``A_h`` are linear adapters from the student's width to the teacher's (trained with the
student, checkpointed with it for exact resume, not saved with the final model). Every student
weight trains, encoders included. The teacher runs without gradients under the training precision.

Config (YAML + ``key=value`` overrides, see :class:`DistillConfig`)::

    stage: distill
    run_dir: runs/distill
    teacher: {path: runs/quickstart/instruct/model}
    student: {builder: small, hidden: 128, layers: 2, encoder_scale: 0.5}
    data: {train: [runs/quickstart/data/medphantom/records/train.jsonl], exclude_tasks: [report]}
    distill: {temperature: 2.0, ce_weight: 1.0, kl_weight: 1.0, feature_weight: 1.0, hidden_weight: 0.0}
    optim: {lr: 1.0e-3, projector_lr: 1.0e-3}
    train: {max_steps: 1500, batch_size: 32}
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Literal, Optional

import torch
import torch.nn.functional as F

from medmllm.errors import ConfigError
from medmllm.train.engine import zero_loss
from medmllm.train.sft import DataConfig, OptimConfig, SFTTrain

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
_FORWARD_KEYS = ("input_ids", "attention_mask", "modality_inputs", "modality_batch_index")


@dataclasses.dataclass
class TeacherConfig:
    path: str = ""                        # a saved MedMLLM folder (model + tokenizer)


@dataclasses.dataclass
class StudentConfig:
    path: Optional[str] = None            # continue a saved student; else build one:
    builder: str = "small"                # a BUILDERS name that takes hidden/layers/encoder_scale/tokenizer
    family: Optional[str] = None          # None: the teacher's LLM model_type
    hidden: int = 128
    layers: int = 2
    encoder_scale: float = 0.5
    seed: int = 0


@dataclasses.dataclass
class DistillSettings:
    temperature: float = 2.0
    ce_weight: float = 1.0
    kl_weight: float = 1.0
    feature_weight: float = 1.0           # modality tokens entering the LLM (projector outputs)
    hidden_weight: float = 0.0            # the LLM's last hidden state on answer tokens

    def __post_init__(self) -> None:
        for name in ("temperature", "ce_weight", "kl_weight", "feature_weight", "hidden_weight"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or not math.isfinite(v):
                raise ConfigError(f"distill.{name}: expected a finite number >= 0, got {v!r}")
        if self.temperature <= 0:
            raise ConfigError(f"distill.temperature: expected a number > 0, got {self.temperature!r}")
        if self.ce_weight + self.kl_weight + self.feature_weight + self.hidden_weight == 0:
            raise ConfigError("distill: expected at least one of ce_weight, kl_weight, feature_weight, "
                              "hidden_weight > 0, got all 0")


@dataclasses.dataclass
class DistillConfig:
    stage: Literal["distill"]
    run_dir: str
    teacher: TeacherConfig = dataclasses.field(default_factory=TeacherConfig)
    student: StudentConfig = dataclasses.field(default_factory=StudentConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    distill: DistillSettings = dataclasses.field(default_factory=DistillSettings)
    optim: OptimConfig = dataclasses.field(default_factory=lambda: OptimConfig(lr=1e-3, projector_lr=1e-3,
                                                                                warmup_steps=30))
    train: SFTTrain = dataclasses.field(default_factory=SFTTrain)
    resume: bool = True


# ----------------------------------------------------------------------------- models

class Student(torch.nn.Module):
    """What the engine trains: the student and its adapters to the teacher's width."""

    def __init__(self, model, student_hidden: int, teacher_hidden: int):
        super().__init__()
        self.model = model
        self.feature_adapter = torch.nn.Linear(student_hidden, teacher_hidden)
        self.hidden_adapter = torch.nn.Linear(student_hidden, teacher_hidden)


def hidden_size(model) -> int:
    return int(model.get_input_embeddings().weight.shape[1])


def build_student(cfg: StudentConfig, teacher, tokenizer):
    """The student: loaded from ``cfg.path`` or built by ``cfg.builder`` with the teacher's tokenizer.
    Raises ConfigError when its vocabulary or tokens per input differ from the teacher's."""
    from medmllm.model.builders import BUILDERS
    from medmllm.model.mllm import MedMLLM

    if cfg.path:
        path = Path(cfg.path)
        if not (path / "config.json").exists():
            raise ConfigError(f"student.path: {path} holds no saved model (config.json missing)")
        student = MedMLLM.from_pretrained(path)
    else:
        family = cfg.family or teacher.llm.config.model_type
        student, _ = BUILDERS.get(cfg.builder)(family=family, hidden=cfg.hidden, layers=cfg.layers,
                                               encoder_scale=cfg.encoder_scale, tokenizer=tokenizer, seed=cfg.seed)
    check_compatible(teacher, student)
    return student


def check_compatible(teacher, student) -> None:
    """Same vocabulary, placeholder ids and modalities (the logit KL and feature matching need them)."""
    tv, sv = teacher.llm.config.vocab_size, student.llm.config.vocab_size
    if tv != sv:
        raise ConfigError(f"student: expected the teacher's vocabulary size {tv}, got {sv}")
    tp, sp = teacher.config.placeholder_token_ids, student.config.placeholder_token_ids
    if tp != sp:
        raise ConfigError(f"student: expected the teacher's modality placeholder ids {tp}, got {sp}")


def check_same_tokens(teacher, student, shapes: dict[str, tuple]) -> None:
    """Tokens per input of each kind must agree, so the placeholders line up (ConfigError otherwise)."""
    for kind, shape in shapes.items():
        if kind in teacher.encoders:
            t, s = teacher.num_tokens(kind, shape), student.num_tokens(kind, shape)
            if t != s:
                raise ConfigError(f"student: {kind} inputs of shape {shape} give {s} tokens, expected the "
                                  f"teacher's {t} (feature matching needs the same placeholders)")


# ----------------------------------------------------------------------------- loss

def answer_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
              temperature: float) -> torch.Tensor:
    """``T^2 * KL(p_teacher || p_student)`` at temperature ``T``, averaged over answer tokens.

    ``*_logits [B, L, V]`` predict token ``t+1`` at position ``t``; ``labels [B, L]`` are -100 off
    answer tokens (as the collator writes them). Returns a scalar (0 when no answer token).
    """
    where = labels[:, 1:] != IGNORE_INDEX                                     # [B, L-1]
    if not where.any():
        return student_logits.sum() * 0.0
    s = student_logits[:, :-1][where].float() / temperature                  # [N, V]
    t = teacher_logits[:, :-1][where].float() / temperature                  # [N, V]
    kl = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="batchmean")
    return kl * temperature ** 2


def normalised_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``mean((pred - target)^2) / mean(target^2)``: 1.0 for a zero prediction, whatever the scale."""
    if pred.numel() == 0:
        return pred.sum() * 0.0
    target = target.float()
    return F.mse_loss(pred.float(), target) / target.pow(2).mean().clamp_min(1e-8)


def make_loss_fn(teacher, settings: DistillSettings):
    """``loss_fn(student_module, batch)`` of the engine: the weighted sum above + each term."""
    placeholder_ids = sorted(teacher.config.placeholder_token_ids.values())

    def loss_fn(module: Student, batch: dict) -> dict:
        student = module.model
        if batch["input_ids"].shape[0] == 0:  # every sample of this micro-batch was dropped
            zero = zero_loss(module)
            return {"loss": zero, **{k: zero.detach() for k in ("ce", "kl", "feature", "hidden")}}
        inputs = {k: batch[k] for k in _FORWARD_KEYS if k in batch}
        labels = batch["labels"]                                                         # [B, L]
        need_hidden = settings.hidden_weight > 0
        with torch.no_grad():
            t_emb, t_att, t_pos = teacher.embed_inputs(**inputs)                         # [B, L, Ht]
            t_out = teacher.llm(inputs_embeds=t_emb, attention_mask=t_att, position_ids=t_pos,
                                output_hidden_states=need_hidden)
        s_emb, s_att, s_pos = student.embed_inputs(**inputs)                             # [B, L, Hs]
        s_out = student.llm(inputs_embeds=s_emb, attention_mask=s_att, position_ids=s_pos, labels=labels,
                            output_hidden_states=need_hidden)
        ce = s_out.loss
        kl = answer_kl(s_out.logits, t_out.logits, labels, settings.temperature)
        modality = torch.isin(batch["input_ids"], torch.tensor(placeholder_ids, device=labels.device))
        modality &= t_att.bool()                                                         # [B, L]
        feature = normalised_mse(module.feature_adapter(s_emb[modality]), t_emb[modality])
        if need_hidden:
            answer = labels != IGNORE_INDEX                                              # [B, L]
            hidden = normalised_mse(module.hidden_adapter(s_out.hidden_states[-1][answer]),
                                    t_out.hidden_states[-1][answer])
        else:
            hidden = ce.detach() * 0.0
        loss = (settings.ce_weight * ce + settings.kl_weight * kl + settings.feature_weight * feature
                + settings.hidden_weight * hidden)
        return {"loss": loss, "ce": ce.detach(), "kl": kl.detach(), "feature": feature.detach(),
                "hidden": hidden.detach()}

    return loss_fn


# ----------------------------------------------------------------------------- the recipe

def parameter_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def run(cfg: DistillConfig, progress: bool = True) -> dict:
    """Train the student; it ends up (with the teacher's tokenizer) in ``run_dir/model``. Returns a summary
    with both parameter counts."""
    from medmllm.train.engine import TrainLoop, make_accelerator, seed_everything
    from medmllm.train.sft import (ModelConfig, data_shapes, instruction_loader, load_model, load_records,
                                   make_scheduler, modality_shapes_of, warn_skipped)

    # setup ------------------------------------------------------------------
    run_dir = Path(cfg.run_dir)
    seed_everything(cfg.train.seed)
    if not cfg.teacher.path:
        raise ConfigError("teacher.path: expected a saved model folder (e.g. runs/quickstart/instruct/model)")
    records, bases, data_hash = load_records(cfg.data)            # bad data fails before any training
    teacher, tokenizer = load_model(ModelConfig(path=cfg.teacher.path))
    teacher.requires_grad_(False)
    teacher.eval()
    student = build_student(cfg.student, teacher, tokenizer)
    shapes = data_shapes(teacher, cfg.data)
    check_same_tokens(teacher, student, modality_shapes_of(shapes))
    module = Student(student, hidden_size(student), hidden_size(teacher))
    n_teacher, n_student = parameter_count(teacher), parameter_count(student)
    log.info("distill: teacher %d parameters, student %d (%.3f of the teacher)", n_teacher, n_student,
             n_student / n_teacher)
    named = list(module.named_parameters())
    projectors = [p for n, p in named if n.startswith("model.projectors.")]
    rest = [p for n, p in named if not n.startswith("model.projectors.")]       # encoders, LLM, adapters
    optimizer = torch.optim.AdamW([{"params": projectors, "lr": cfg.optim.projector_lr},
                                   {"params": rest, "lr": cfg.optim.lr}], weight_decay=cfg.optim.weight_decay)
    scheduler = make_scheduler(optimizer, cfg.optim, cfg.train.max_steps)
    t = cfg.train
    acc = make_accelerator(t.mixed_precision, t.grad_accum)
    teacher.to(acc.device)
    dataset, loader = instruction_loader(records, bases, cfg.data, t, teacher, tokenizer, shapes, acc)
    loop = TrainLoop(module, optimizer, scheduler, loader, make_loss_fn(teacher, cfg.distill), run_dir=run_dir, max_steps=t.max_steps,
                     grad_accum=t.grad_accum, log_every=t.log_every, ckpt_every=t.ckpt_every, keep_last=t.keep_last,
                     mixed_precision=t.mixed_precision, grad_clip=t.grad_clip, seed=t.seed,
                     gradient_checkpointing=False, tensorboard=t.tensorboard, accelerator=acc, config=cfg,
                     manifest_hash=data_hash, progress=progress)
    if cfg.resume:
        loop.resume("latest")
    # train ------------------------------------------------------------------
    result = loop.run()
    # save -------------------------------------------------------------------
    out = run_dir / "model"
    if acc.is_main_process:
        acc.unwrap_model(loop.model).model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    acc.wait_for_everyone()
    # cleanup ----------------------------------------------------------------
    warn_skipped(dataset)
    loss = result["loss"]
    return {"stage": "distill", "steps": result["step"], "loss": None if loss is None or math.isnan(loss) else loss,
            "model": str(out), "records": len(records), "teacher_parameters": n_teacher,
            "student_parameters": n_student, "parameter_ratio": n_student / n_teacher,
            "metrics": dict(loop.last_metrics), "run_dir": str(run_dir)}


__all__ = ["DistillConfig", "DistillSettings", "Student", "StudentConfig", "TeacherConfig", "answer_kl",
           "build_student", "check_compatible", "make_loss_fn", "normalised_mse", "run"]

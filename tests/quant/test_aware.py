"""QAD and QAT (nemojax.quant.aware): the loss is the teacher KL, steps lower it, only the student's weights move."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

import nemojax
from nemojax import quant
from nemojax.compress.distill import distillation_loss, finetune, kd_logits
from nemojax.data import DataConfig, make_dataset
from nemojax.lowp.recipe import is_state
from nemojax.train.optim import OptimizerConfig
from nemojax.train.step import lm_loss

B, L = 4, 32
TEACHER = OptimizerConfig(lr=3e-3, total_steps=100, warmup_steps=0, schedule="constant", weight_decay=0.0)
# QAD moves weights that already solve the task: a small LR (NVIDIA uses 1e-5 at scale; 3e-3 here diverges)
FAST = quant.QADConfig(optimizer=OptimizerConfig(lr=1e-4, total_steps=100, warmup_steps=0, schedule="constant",
                                                 weight_decay=0.0), batch_size=B, seq_len=L)


@pytest.fixture(scope="module")
def batches() -> list[dict[str, np.ndarray]]:
    it = make_dataset(DataConfig(kind="stdlib", tokenizer="byte"), "train", seq_len=L, batch_size=B, seed=0)
    return [next(it) for _ in range(24)]


@pytest.fixture(scope="module")
def teacher(batches) -> nemojax.Model:
    """A tiny hybrid given some skill (so its distribution is worth matching); a wide initialisation keeps its
    logits far from uniform, so quantization visibly moves them."""
    config = nemojax.presets.get("nemotron-h-8b-tiny", vocab_size=260, pattern="M*-", initializer_range=0.1)
    model = nemojax.Model.init(config, 0)
    return finetune(model, batches[:12], 12, optimizer=TEACHER, batch_size=B, seq_len=L)[0]


@pytest.fixture(scope="module")
def student(teacher, batches) -> nemojax.Model:
    return quant.calibrate(quant.apply(teacher, "nvfp4"), [b["tokens"] for b in batches[:2]])


def _kl(student: nemojax.Model, teacher: nemojax.Model, batch) -> float:
    return float(kd_logits(student(batch["tokens"]), teacher(batch["tokens"]), jnp.asarray(batch["loss_mask"])))


def test_qad_loss_is_the_teacher_kl(student, teacher, batches):
    """Step 1's loss is KL(p_T || p_S) of the fake-quantized student (T = 1, no label term); zero for a student
    that is the teacher itself."""
    loss_fn = distillation_loss(student.config, teacher.config, teacher.params)
    batch = batches[20]
    loss, aux = loss_fn({"student": student.params, "maps": {}}, batch, jax.random.key(0))
    np.testing.assert_allclose(float(loss), _kl(student, teacher, batch), rtol=1e-4)
    assert float(loss) > 1e-3  # quantization moved the distribution
    self_loss, _ = distillation_loss(teacher.config, teacher.config, teacher.params)(
        {"student": teacher.params, "maps": {}}, batch, jax.random.key(0))
    assert abs(float(self_loss)) < 1e-6


def test_qad_lowers_the_kl_and_moves_only_student_weights(student, teacher, batches):
    held_out = batches[23]
    teacher_before = jax.tree.map(np.asarray, teacher.params)
    trained, history = quant.qad(student, teacher, batches[2:22], steps=20, config=FAST)
    assert len(history) == 20 and "kl" in history[0]
    assert _kl(trained, teacher, held_out) < 0.9 * _kl(student, teacher, held_out)
    jax.tree.map(np.testing.assert_array_equal, teacher_before, jax.tree.map(np.asarray, teacher.params))
    assert trained.config == student.config
    before, after = flatten_dict(student.params), flatten_dict(trained.params)
    for path in before:
        if is_state(path[-1]):
            np.testing.assert_array_equal(np.asarray(before[path]), np.asarray(after[path]))
    assert not np.array_equal(np.asarray(before[("layers_0", "mixer", "in_proj_x", "kernel")]),
                              np.asarray(after[("layers_0", "mixer", "in_proj_x", "kernel")]))


def test_qat_lowers_the_lm_loss(student, batches):
    config = quant.QADConfig(optimizer=TEACHER, batch_size=B, seq_len=L)
    trained, history = quant.qat(student, batches[2:22], steps=20, config=config)
    assert len(history) == 20
    loss = lm_loss(student.config)
    before = float(loss(student.params, batches[23], jax.random.key(0))[0])
    after = float(loss(trained.params, batches[23], jax.random.key(0))[0])
    assert after < before - 0.05


def test_qad_rejects_wrong_roles(student, teacher, batches):
    with pytest.raises(ValueError, match="quantize it first"):
        quant.qad(teacher, teacher, batches, steps=1)
    with pytest.raises(ValueError, match="teacher is the high-precision model"):
        quant.qad(student, student, batches, steps=1)
    with pytest.raises(ValueError, match="temperature"):
        quant.QADConfig(temperature=0.0)

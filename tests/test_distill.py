"""Knowledge distillation (`vitkit train --teacher CKPT`, DeiT without its distillation token): the loss
against DeiT's formulas written out, the teacher fed its own preprocessing, and a student that learns
what its teacher says; on the real digits."""

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from vitkit import create_model, load_pretrained, save_pretrained
from vitkit.data import load_digits, normalize
from vitkit.evaluate import evaluate
from vitkit.train import Interrupted, Teacher, distillation_loss, resolve_config, resume, train


def run_cfg(out, **overrides) -> dict:
    cfg = dict(dataset="digits", model="vit_digits_gap", train_subset=256, batch_size=32, epochs=2, warmup_epochs=0,
               threads=1, progress="off", precision="fp32", ema=False, out=str(out))
    cfg.update(overrides)
    return cfg


def test_distillation_loss_is_deits():
    torch.manual_seed(0)
    student, teacher = torch.randn(6, 10) * 3, torch.randn(6, 10) * 3
    for tau in (1.0, 3.0):
        p_t = (teacher / tau).softmax(-1)
        kl = (p_t * (p_t.log() - (student / tau).log_softmax(-1))).sum()  # KL(teacher || student), summed
        expected = kl * tau**2 / student.numel()
        torch.testing.assert_close(distillation_loss(student, teacher, "soft", tau), expected)
    top = teacher.argmax(-1)
    expected = -(student.log_softmax(-1)[torch.arange(6), top]).mean()
    torch.testing.assert_close(distillation_loss(student, teacher, "hard"), expected)
    with pytest.raises(ValueError, match="distill_type: expected one of"):
        distillation_loss(student, teacher, "medium")


def test_the_teacher_sees_its_own_preprocessing(tmp_path):
    """Grey 8x8 digits normalised for the student; an RGB teacher at 16x16 with ImageNet's statistics
    (its first convolution adapted to grey): the teacher's logits are those of the raw pixels put
    through the teacher's own resize and normalisation."""
    rgb = create_model("vit_digits_gap", in_channels=3, img_size=16, num_classes=10)
    save_pretrained(rgb, tmp_path / "teacher")  # ImageNet mean/std, bicubic
    digits = load_digits()
    raw = digits.val.images[:12]  # uint8 (12, 1, 8, 8)
    teacher = Teacher(str(tmp_path / "teacher"), digits.preprocess, 1, torch.device("cpu"), "fp32")
    got = teacher(normalize(raw, digits.preprocess))
    model = load_pretrained(tmp_path / "teacher", in_channels=1).eval()
    pixels = F.interpolate(raw.float() / 255, size=(16, 16), mode="bicubic", align_corners=False, antialias=True)
    mean, std = (torch.tensor(model.preprocess[k])[:, None, None] for k in ("mean", "std"))
    with torch.no_grad():
        expected = model((pixels - mean) / std)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_a_student_learns_what_its_teacher_says(tmp_path, capsys):
    """A teacher that answers 3 to every image: with alpha 1 (hard), the student answers 3 too;
    without the teacher, trained on the true labels, it does not. A stopped distillation run resumes
    to the weights of a straight one."""
    biased = create_model("vit_digits_gap", num_classes=10)
    with torch.no_grad():
        biased.head.fc.bias[3] = 100.0
    save_pretrained(biased, tmp_path / "teacher", class_names=[str(d) for d in range(10)])
    digits = load_digits()

    def says_three(run) -> float:
        model = load_pretrained(tmp_path / run / "last")
        result = evaluate(model, digits.val, digits.preprocess, 10)
        return float(result["confusion"][:, 3].sum() / result["confusion"].sum())

    distilled = run_cfg(tmp_path / "distilled", teacher=str(tmp_path / "teacher"), distill_alpha=1.0, lr=2e-3)
    train(resolve_config(None, distilled))
    assert "distilling from" in capsys.readouterr().out
    train(resolve_config(None, run_cfg(tmp_path / "alone", lr=2e-3)))
    assert says_three("distilled") > 0.95 and says_three("alone") < 0.5
    with pytest.raises(Interrupted):
        train(resolve_config(None, dict(distilled, out=str(tmp_path / "cut"), stop_after_epoch=1,
                                        distill_type="soft", distill_alpha=0.5, distill_tau=2.0)))
    resume(tmp_path / "cut", {"stop_after_epoch": 0})
    train(resolve_config(None, dict(distilled, out=str(tmp_path / "straight"), distill_type="soft",
                                    distill_alpha=0.5, distill_tau=2.0)))
    cut, straight = (load_file(tmp_path / r / "last" / "model.safetensors") for r in ("cut", "straight"))
    assert all(torch.equal(cut[k], straight[k]) for k in cut)


def test_teacher_errors_name_the_option(tmp_path):
    save_pretrained(create_model("vit_digits_gap", num_classes=4), tmp_path / "four")
    with pytest.raises(ValueError, match="--teacher .*four: scores 4 classes, but --dataset digits has 10"):
        train(resolve_config(None, run_cfg(tmp_path / "run", teacher=str(tmp_path / "four"))))
    save_pretrained(create_model("vit_digits_gap", num_classes=10), tmp_path / "named",
                    class_names=[f"c{d}" for d in range(10)])
    with pytest.raises(ValueError, match="the same classes, in the same order"):
        train(resolve_config(None, run_cfg(tmp_path / "run", teacher=str(tmp_path / "named"), overwrite=True)))
    with pytest.raises(ValueError, match="--teacher .*nowhere: .*no such checkpoint"):
        train(resolve_config(None, run_cfg(tmp_path / "run", teacher=str(tmp_path / "nowhere"), overwrite=True)))
    for key, value, expected in (("distill_type", "medium", "--distill-type: expected one of"),
                                 ("distill_alpha", 1.5, "--distill-alpha: expected a value in [0, 1]"),
                                 ("distill_tau", 0.0, "--distill-tau: expected a temperature > 0")):
        with pytest.raises(ValueError, match=expected.replace("[", r"\[").replace("]", r"\]")):
            resolve_config(None, run_cfg(tmp_path / "run", **{key: value}))


def test_a_distillation_token_learns_the_teacher_and_the_class_token_the_labels(tmp_path):
    """DeiT proper: a model with a distillation token, fine-tuned with a teacher that always answers 3,
    trains its two heads apart: the distillation head answers 3, the class head the digit."""
    biased = create_model("vit_digits_gap", num_classes=10)
    with torch.no_grad():
        biased.head.fc.bias[3] = 100.0
    save_pretrained(biased, tmp_path / "teacher")
    save_pretrained(create_model("vit_digits", num_classes=10, dist_token=True), tmp_path / "student")
    train(resolve_config(None, run_cfg(tmp_path / "run", model="vit_digits", pretrained=str(tmp_path / "student"),
                                       teacher=str(tmp_path / "teacher"), distill_alpha=0.5, lr=3e-3, epochs=15,
                                       train_subset=0, batch_size=64)))
    model = load_pretrained(tmp_path / "run" / "last").eval()
    assert model.cfg.dist_token
    digits = load_digits()
    x = normalize(digits.val.images, digits.preprocess)
    with torch.no_grad():
        tokens = model.forward_features(x)
        cls, dist = model.head.fc(tokens[:, 0]).argmax(-1), model.head.fc_dist(tokens[:, 1]).argmax(-1)
    assert (dist == 3).float().mean() > 0.95
    # 15 epochs of a class-token model: well above chance (10%), and not the teacher's answer
    assert (cls == digits.val.labels).float().mean() > 0.3 and (cls == 3).float().mean() < 0.3

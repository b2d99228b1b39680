"""The summary table: true totals (torchsummary misses class token and positions) and GMACs."""

import subprocess
import sys

import torch

import vitkit


def test_seed_model_totals_and_gmacs(capsys):
    s = vitkit.summary(vitkit.ViT(), (3, 224, 224))
    assert s.total_params == 86_567_656
    # torchsummary's total, which only counted .weight/.bias, is short by the tokens and positions
    weights_and_biases = sum(p.numel() for n, p in vitkit.ViT().named_parameters() if n.endswith(("weight", "bias")))
    assert weights_and_biases == 86_415_592
    assert s.total_params - weights_and_biases == 152_064
    assert sum(r.params for r in s.rows) == s.total_params
    assert abs(s.gmacs - 17.58) < 0.05
    table = capsys.readouterr().out
    assert "PatchEmbedding" in table and "Total params: 86,567,656" in table
    assert "[-1, 8, 197, 197]" in table  # the attention probabilities' row, as in the seed


def test_gmacs_matches_an_independent_count():
    model = vitkit.create_model("vit_small_patch16_224")
    cfg = model.cfg
    n, e, h = cfg.num_patches + 1, cfg.emb_size, cfg.mlp_hidden
    per_block = n * e * 3 * e + n * e * e + 2 * n * e * h + 2 * n * n * e  # qkv, proj, mlp, attention matmuls
    expected = cfg.depth * per_block + cfg.num_patches * e * 3 * 16 * 16 + e * cfg.num_classes
    s = vitkit.summary(model, print_table=False)
    assert s.macs == expected


def test_summary_cli():
    out = subprocess.run([sys.executable, "-m", "vitkit", "summary", "vit_digits", "--input", "1", "8", "8"],
                         capture_output=True, text=True, check=True).stdout
    assert "Total params: 136,138" in out
    bad = subprocess.run([sys.executable, "-m", "vitkit", "summary", "vit_tiny_patch16_2244"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "did you mean vit_tiny_patch16_224" in bad.stderr


def test_summary_cli_of_a_variant_is_the_real_models_table(capsys):
    """`vitkit summary NAME` builds the model on the meta device (no weights, any size at once): its
    table is the one a real model on the CPU gives, rows, totals and GMACs; so is the giant's count."""
    from vitkit.cli import main

    assert main(["summary", "vit_small_patch16_224"]) == 0
    printed = capsys.readouterr().out
    vitkit.summary(vitkit.create_model("vit_small_patch16_224"))
    assert printed == capsys.readouterr().out
    assert main(["summary", "vit_giant_patch14_dinov2"]) == 0
    assert "Total params: 1,136,479,232" in capsys.readouterr().out  # timm's count


def test_summary_leaves_the_model_as_it_was():
    model = vitkit.create_model("vit_digits").train()
    vitkit.summary(model, print_table=False)
    assert model.training and all(b.attn.fused for b in model.encoder.blocks)
    assert not any(m._forward_hooks for m in model.modules())
    torch.testing.assert_close(model.eval()(torch.ones(1, 1, 8, 8)), model(torch.ones(1, 1, 8, 8)))


def test_convolutional_stem_is_counted():
    """A conv stem's convs appear as rows, and its MACs add to those of the transformer."""
    patch = vitkit.create_model("vit_fmnist")
    conv = vitkit.create_model("vit_fmnist_convstem")
    s_patch, s_conv = vitkit.summary(patch, print_table=False), vitkit.summary(conv, print_table=False)
    # vit_fmnist_convstem: 1 -> 16 (3x3, 28x28 out), 16 -> 32 (3x3, stride 2, 14x14), 32 -> 64 (3x3, stride 2,
    # 7x7), 64 -> 64 (1x1), against one 4x4 patch conv 1 -> 64 per 7x7 token
    stem_macs = 28 * 28 * 16 * 9 * 1 + 14 * 14 * 32 * 9 * 16 + 7 * 7 * 64 * 9 * 32 + 7 * 7 * 64 * 64
    patch_macs = 7 * 7 * 64 * 16
    assert s_conv.macs - s_patch.macs == stem_macs - patch_macs
    assert [r.output_shape for r in s_conv.rows if r.name.startswith("Conv2d")] == [
        [1, 16, 28, 28], [1, 32, 14, 14], [1, 64, 7, 7], [1, 64, 7, 7]]


def test_a_module_called_twice_owns_its_parameters_once():
    """DeiT's pooled head norm runs on the class and the distillation token: two rows, one count, and
    the rows still add up to the model's total (no negative '(other parameters)')."""
    model = vitkit.create_model("deit_tiny_distilled_patch16_224", img_size=32, depth=1, final_norm="pooled")
    result = vitkit.summary(model, print_table=False)
    norm_rows = [r for r in result.rows if r.path == "head.norm"]
    assert len(norm_rows) == 2 and sorted(r.params for r in norm_rows) == [0, 2 * 192]
    assert sum(r.params for r in result.rows) == sum(p.numel() for p in model.parameters())
    assert all(r.params >= 0 for r in result.rows)


def test_summary_cli_of_a_checkpoint_at_another_input_size(tmp_path, capsys):
    """`vitkit summary CKPT --input C H W` refused any size but the checkpoint's ('expected image size
    16x16 ... build the model with img_size=') where `vitkit summary NAME --input ...` builds the variant
    at it: the checkpoint is now loaded at that size (positions resampled), channels adapted likewise;
    a size the config refuses is named by the flag, for a variant and a checkpoint alike."""
    from vitkit.cli import main

    cfg = vitkit.ViTConfig(img_size=16, patch_size=4, emb_size=32, depth=2, num_heads=4, num_classes=5)
    ckpt = vitkit.save_pretrained(vitkit.ViT(cfg), tmp_path / "ckpt")
    for c, h, w in ((3, 24, 32), (1, 16, 16), (3, 16, 16)):
        assert main(["summary", str(ckpt), "--input", str(c), str(h), str(w)]) == 0
        printed = capsys.readouterr().out
        vitkit.summary(vitkit.load_pretrained(ckpt, img_size=(h, w), in_channels=c), (c, h, w))
        assert printed == capsys.readouterr().out
        assert f"[-1, {1 + h // 4 * w // 4}, 32]" in printed  # the tokens of that size
    for model in (str(ckpt), "vit_digits"):
        for size, expected in ((("3", "9", "12"), "not divisible by patch_size"), (("3", "0", "16"), "positive"),
                               (("0", "16", "16"), "in_channels")):
            assert main(["summary", model, "--input", *size]) == 2
            err = capsys.readouterr().err
            assert f"--input {' '.join(size)}: ViTConfig." in err and expected in err, (model, err)


def test_models_cli_matches_any_case_and_says_when_nothing_matches(capsys):
    """'VIT_DIGITS*' and 'nomatch*' both printed nothing and exited 0 (fnmatch is case-sensitive on POSIX):
    the pattern now matches whatever the case, and one that matches nothing is an error naming it."""
    from vitkit.cli import main

    assert vitkit.list_models("VIT_DIGITS*") == vitkit.list_models("vit_digits*") == ["vit_digits", "vit_digits_gap"]
    assert vitkit.list_models("Vit_Digits_GAP") == ["vit_digits_gap"]
    for pattern in ("VIT_DIGITS*", "vit_digits*", "*_DIGITS_gap"):
        assert main(["models", pattern]) == 0
        names = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
        assert names == vitkit.list_models(pattern) and names, pattern
    assert main(["models", "nomatch*"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "no model matches 'nomatch*'" in captured.err


def test_an_attention_pool_is_counted_on_the_cpu_as_on_the_meta_device():
    """SigLIP's attention pool calls the fused kernel, which FlopCounterMode cannot see on a CPU: the
    summary counts it written out, so a model's table is the same wherever it lives (the pool's two
    matmuls: 2 * N * E multiply-adds per image)."""
    cpu = vitkit.summary(vitkit.create_model("vit_base_patch16_siglip_224", depth=1), (3, 224, 224), print_table=False)
    with torch.device("meta"):
        meta = vitkit.summary(vitkit.create_model("vit_base_patch16_siglip_224", depth=1), (3, 224, 224),
                              print_table=False)
    assert cpu.macs == meta.macs
    without_pool = vitkit.summary(vitkit.create_model("vit_base_patch16_siglip_224", depth=1, global_pool="avg"),
                                  (3, 224, 224), print_table=False)
    pool = vitkit.create_model("vit_base_patch16_siglip_224", depth=1).head.attn_pool
    linears = sum(m.in_features * m.out_features for m in pool.modules() if isinstance(m, torch.nn.Linear))
    n, e = 196, 768
    # q and the MLP read one token, kv every token: the pool's Linear layers as run, and its attention
    run = linears - 2 * e * e + 2 * e * e * n
    assert cpu.macs - without_pool.macs == run + 2 * n * e

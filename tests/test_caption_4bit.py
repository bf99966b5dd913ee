"""caption.py's real-model path (issue 12) on the CPU: the tiny Mllama quantized for real by bitsandbytes
(Linear4bit, NF4), trained through peft's prepare_model_for_kbit_training with non-reentrant checkpointing, the
vision layers checkpointed, --predict on the 4-bit model, the precision policy, fp16 with a GradScaler on the CPU
and its state across a resume, the unsloth backend's dtype and its one-line errors, and training on every
caption."""
import inspect
import io
import json
import os
import sys
import types
import weakref

import pytest
import torch
from PIL import Image

import caption
from test_caption import rows_of_test_file, COLOURS, load, saved_folder, saved_state, write_parquet


@pytest.fixture
def tiny(monkeypatch):
    settings = dict(tiny=True, backend="transformers", load_in_4bit=True, precision="fp32", gradient_checkpointing=True,
                    batch_size=2, grad_accum=1, lr=5e-3, warmup_steps=1, max_steps=2, eval_every=100,
                    save_every=100, val_samples=2, max_new_tokens=4, predict_batch_size=4, log_every=1,
                    max_minutes=0.0, lora_r=8, lora_alpha=16)
    for name, value in settings.items():
        monkeypatch.setattr(caption, name, value)


@pytest.fixture
def data_dir(tmp_path):
    write_parquet(tmp_path / "train_data.parquet", 8)
    write_parquet(tmp_path / "valid_data.parquet", 2)
    write_parquet(tmp_path / "test_data.parquet", 3, kind="test")
    return str(tmp_path)


def image(colour):
    return Image.new("RGB", (64, 64), COLOURS[colour])


def linear4bit_names(model):
    import bitsandbytes as bnb
    return [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]


# ----------------------------------------------------------------------------- 4-bit for real
def test_the_tiny_model_is_quantized_for_real_with_the_skip_modules_kept(tiny):
    base, _ = caption.load_base("fp32", use_cuda=False)
    quantized = linear4bit_names(base)
    # 4 language layers x 7 projections (self- and cross-attention, MLP) become NF4; nothing else does
    assert len(quantized) == 4 * 7 and all(".language_model." in n for n in quantized)
    first = dict(base.named_modules())[quantized[0]]
    assert first.weight.dtype == torch.uint8 and first.weight.quant_state.quant_type == "nf4"
    plain = {n for n, m in base.named_modules() if type(m) is torch.nn.Linear}
    assert "lm_head" in plain and "model.multi_modal_projector" in plain
    assert any(n.startswith("model.vision_model.") and n.endswith("q_proj") for n in plain)
    assert base.is_loaded_in_4bit


@pytest.mark.parametrize("finetune_vision", [True, False])
def test_three_kbit_training_steps_lower_the_loss_with_a_gradient_on_every_lora_tensor(tiny, monkeypatch,
                                                                                      finetune_vision):
    monkeypatch.setattr(caption, "finetune_vision", finetune_vision)
    import peft
    calls = []
    real_prepare = peft.prepare_model_for_kbit_training

    def spy(model, **kwargs):
        calls.append(kwargs)
        return real_prepare(model, **kwargs)
    monkeypatch.setattr(peft, "prepare_model_for_kbit_training", spy)
    model, processor, _ = load(trainable=True)
    # peft's preparation for k-bit training, then non-reentrant checkpointing (transformers') of the language layers
    assert calls == [{"use_gradient_checkpointing": False}]
    checkpointed = [m._gradient_checkpointing_func for m in model.modules() if getattr(m, "gradient_checkpointing", 0)]
    assert checkpointed and all(f.keywords == {"use_reentrant": False} for f in checkpointed)
    assert len(linear4bit_names(model)) == 28
    lora = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert lora and all(".lora_A." in n or ".lora_B." in n for n in lora)
    assert any("vision_model" in n for n in lora) == finetune_vision
    batch = caption.make_batch(processor, [image("red"), image("blue")], ["A red square .", "A blue square ."])
    optimizer = torch.optim.AdamW(lora.values(), lr=1e-2)
    model.train()
    losses = []
    for step in range(3):
        loss = model(**batch).loss
        loss.backward()
        if step > 0:   # at step 0 every lora_B is 0, so lora_A's gradient is 0 by construction
            missing = [n for n, p in lora.items() if p.grad is None or not p.grad.abs().sum() > 0]
            assert not missing, missing
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[2] < losses[1] < losses[0], losses


def test_the_old_reentrant_preparation_fails_on_the_first_backward(tiny, monkeypatch):
    """The control for the test above: peft's preparation with reentrant checkpointing (peft's default up to 0.21,
    which left use_reentrant unset; asked for by name here, as peft 0.22 with transformers 5.23 defaults to
    non-reentrant). Reentrant checkpointing of the language layers, whose inputs do not require grad, cuts every LoRA
    matrix off the loss (where a hook makes the inputs require grad instead, the first backward crashes on the
    cross-attention states: "backward through the graph a second time")."""
    import peft
    real_prepare = peft.prepare_model_for_kbit_training
    # the keyword's name: gradient_checkpointing_kwargs up to peft 0.21, activation_checkpointing_kwargs from 0.22
    name = next(n for n in ("activation_checkpointing_kwargs", "gradient_checkpointing_kwargs")
                if n in inspect.signature(real_prepare).parameters)
    monkeypatch.setattr(peft, "prepare_model_for_kbit_training", lambda model, **kwargs: real_prepare(
        model, use_gradient_checkpointing=True, **{name: {"use_reentrant": True}}))
    monkeypatch.setattr(caption, "gradient_checkpointing", False)   # only the language layers, as before the fix
    monkeypatch.setattr(caption, "finetune_vision", False)
    model, processor, _ = load(trainable=True)
    model.train()
    batch = caption.make_batch(processor, [image("red")], ["A red square ."])
    with pytest.raises(RuntimeError, match="does not require grad"):
        model(**batch).loss.backward()


def test_vision_layers_are_checkpointed_with_the_same_gradients(tiny, monkeypatch):
    monkeypatch.setattr(caption, "load_in_4bit", False)
    grads, recomputed = {}, {}
    for checkpointing in (False, True):
        monkeypatch.setattr(caption, "gradient_checkpointing", checkpointing)
        model, processor, _ = load(trainable=True)
        torch.manual_seed(0)
        with torch.no_grad():   # the same nonzero LoRA in both models, so vision LoRA gets a real gradient
            for name, p in sorted(model.named_parameters()):
                if p.requires_grad:
                    p.normal_(std=0.1)
        vision_layers = [m for n, m in model.named_modules() if type(m).__name__ == "MllamaVisionEncoderLayer"]
        assert len(vision_layers) == 3
        calls = []
        vision_layers[0].self_attn.register_forward_hook(lambda *args: calls.append(1))
        model.train()
        batch = caption.make_batch(processor, [image("red"), image("green")], ["A red square .", "A green one ."])
        model(**batch).loss.backward()
        grads[checkpointing] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        recomputed[checkpointing] = len(calls)
        # no hook makes the frozen patch embedding's output require grad (backward through the frozen tower)
        assert not any(getattr(h, "__name__", "").startswith("make_inputs_require_grad")
                       for m in model.modules() for h in m._forward_hooks.values())
    assert recomputed == {False: 1, True: 2}          # checkpointed: the layer runs again in backward
    assert grads[True].keys() == grads[False].keys()
    vision = [n for n in grads[True] if "vision_model" in n]
    assert vision and all(grads[True][n].abs().sum() > 0 for n in vision)
    for name in grads[True]:
        torch.testing.assert_close(grads[True][name], grads[False][name], rtol=1e-5, atol=1e-7, msg=name)


def test_predict_on_the_4bit_model_writes_a_valid_submission(tiny, data_dir, tmp_path, monkeypatch):
    out_dir = str(tmp_path / "out")
    caption.train_model(data_dir, out_dir)
    import peft
    prepared = []
    monkeypatch.setattr(peft, "prepare_model_for_kbit_training", lambda *a, **k: prepared.append(1))
    loaded = []
    real_load = caption.load_model

    def spy(*args, **kwargs):
        result = real_load(*args, **kwargs)
        loaded.append(result[0])
        return result
    monkeypatch.setattr(caption, "load_model", spy)
    caption.write_submission(rows_of_test_file(data_dir), out_dir, str(tmp_path / "submission.json"))
    assert len(linear4bit_names(loaded[0])) == 28 and prepared == []    # 4-bit, and no k-bit training prep
    assert not any(p.requires_grad for p in loaded[0].parameters())
    submission = json.loads((tmp_path / "submission.json").read_text())
    assert [s["idx"] for s in submission] == [0, 1, 2]
    assert all(set(s) == {"idx", "output"} and isinstance(s["output"], str) for s in submission)


# ----------------------------------------------------------------------------- precision
@pytest.fixture
def a_build_for_every_gpu(monkeypatch):
    """For the precision tests: choose_precision checks the build's kernels first (check_cuda_build), so the build
    lists every capability they mock. A CPU build lists none (nothing to check), but a CUDA build run without a GPU
    lists its own, and torch 2.14.1+cu130's start at sm_75: a mocked P100 (6.0) would stop there instead."""
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_60", "sm_70", "sm_75", "sm_80", "sm_90"])


@pytest.mark.parametrize("capability, expected", [((7, 5), "fp16"), ((7, 0), "fp16"), ((6, 1), "fp16"),
                                                  ((8, 0), "bf16"), ((8, 6), "bf16"), ((9, 0), "bf16")])
def test_precision_follows_the_cuda_capability(a_build_for_every_gpu, monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert caption.choose_precision("auto", "cuda") == expected
    assert caption.choose_precision("fp32", "cuda") == "fp32"


@pytest.mark.parametrize("capability", [(6, 0), (7, 5)])
def test_bf16_is_never_run_below_capability_8(a_build_for_every_gpu, monkeypatch, capability):
    """A P100 (6.0) fails in cuBLAS and a T4 (7.5) only emulates bf16: asked for there, it stops naming fp16."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    with pytest.raises(ValueError, match=rf"^--precision=bf16 needs CUDA capability 8.0, this GPU has "
                                         rf"{capability[0]}.{capability[1]}: use --precision=fp16"):
        caption.choose_precision("bf16", "cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert caption.choose_precision("bf16", "cuda") == "bf16"


def test_both_entry_points_check_the_precision_before_loading_a_model(a_build_for_every_gpu, tiny, data_dir, tmp_path,
                                                                      monkeypatch):
    """--precision=bf16 on a P100 (6.0) stops --train and --predict with one line, before any model loads."""
    caption.train_model(data_dir, str(tmp_path / "out"))     # a model to predict with, on the CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (6, 0))
    monkeypatch.setattr(caption, "precision", "bf16")
    monkeypatch.setattr(caption, "load_transformers", lambda *args: pytest.fail("a model loaded"))
    for entry_point in (lambda: caption.train_model(data_dir, str(tmp_path / "out2")),
                        lambda: caption.write_submission(rows_of_test_file(data_dir), str(tmp_path / "out"),
                                                         str(tmp_path / "s.json"))):
        with pytest.raises(ValueError, match="^--precision=bf16 needs CUDA capability 8.0, this GPU has 6.0"):
            entry_point()


def test_the_cuda_build_is_checked_on_every_gpu_entry_point(tiny, data_dir, tmp_path, monkeypatch):
    """A PyTorch build without kernels for the GPU stops with one line (a P100 under a build for sm_70 and newer),
    on --train and on --predict, before any model loads. A cubin sm_XY runs on X.y for y >= Y, PTX on newer."""
    caption.train_model(data_dir, str(tmp_path / "out"))     # a model to predict with, on the CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (6, 0))
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_70", "sm_75", "sm_80", "compute_80"])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla P100-PCIE-16GB")
    monkeypatch.setattr(caption, "load_transformers", lambda *args: pytest.fail("a model loaded"))
    for entry_point in (lambda: caption.train_model(data_dir, str(tmp_path / "out2")),
                        lambda: caption.write_submission(rows_of_test_file(data_dir), str(tmp_path / "out"),
                                                         str(tmp_path / "s.json"))):
        with pytest.raises(ValueError, match=r"^this PyTorch .* has GPU kernels for sm_70 sm_75 sm_80 compute_80, "
                                             r"none for Tesla P100-PCIE-16GB \(sm_60\)"):
            entry_point()
    for archs in (["sm_60", "sm_70"], ["sm_50", "compute_60"], []):   # its cubin, PTX for it, or no list at all
        monkeypatch.setattr(torch.cuda, "get_arch_list", lambda archs=archs: archs)
        assert caption.choose_precision("auto", "cuda") == "fp16"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_80"])     # an sm_80 cubin runs on 8.6
    assert caption.choose_precision("auto", "cuda") == "bf16"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    with pytest.raises(ValueError, match=r"none for .* \(sm_90\)"):         # but not on 9.0
        caption.choose_precision("auto", "cuda")


def test_precision_on_the_cpu(monkeypatch):
    """auto: bf16 where /proc/cpuinfo lists AMX or AVX512-BF16, fp32 elsewhere."""
    if not os.path.exists("/proc/cpuinfo"):
        pytest.skip("not Linux")
    for flags, expected in [("fpu sse avx512_bf16", "bf16"), ("fpu amx_bf16", "bf16"), ("fpu sse avx2", "fp32")]:
        monkeypatch.setattr(caption, "open", lambda path, flags=flags: io.StringIO(f"flags : {flags}\n"),
                            raising=False)
        assert caption.choose_precision("auto", "cpu") == expected


def test_the_4bit_compute_dtype_and_16bit_weights_follow_the_precision(tiny, monkeypatch):
    """On a T4 (fp16): NF4 layers compute in fp16, the skipped matrices are stored in fp16 (not the fp32 peft's
    preparation upcasts them to), norms stay fp32, LoRA is fp32 for the scaler."""
    monkeypatch.setattr(caption, "precision", "fp16")
    model, _, _ = load(trainable=True)
    modules = dict(model.named_modules())
    assert all(modules[n].compute_dtype == torch.float16 for n in linear4bit_names(model))
    assert model.base_model.model.lm_head.weight.dtype == torch.float16
    assert model.base_model.model.model.language_model.embed_tokens.weight.dtype == torch.float16
    assert model.base_model.model.model.language_model.norm.weight.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


def test_fp16_with_a_grad_scaler_trains_on_the_cpu_and_resumes_with_the_scaler_state(tiny, data_dir, tmp_path,
                                                                                     monkeypatch):
    """Both backends' loop: autocast fp16 and a GradScaler (enabled), its state saved in last/state.pt and loaded
    on resume."""
    monkeypatch.setattr(caption, "precision", "fp16")
    monkeypatch.setattr(caption, "max_steps", 3)
    monkeypatch.setattr(caption, "max_minutes", 1e-9)          # stop after each step
    out_dir = str(tmp_path / "out")
    caption.train_model(data_dir, out_dir)
    path = os.path.join(saved_folder(out_dir), "state.pt")
    state = torch.load(path, weights_only=True)
    assert state["step"] == 1 and state["precision"] == "fp16"
    assert state["scaler"]["scale"] in (65536.0, 32768.0)    # enabled: the default scale, halved on an overflow
    state["scaler"]["scale"] = 1024.0                         # a value only the saved state can bring back
    torch.save(state, path)
    seen = []
    real_unscale = torch.amp.GradScaler.unscale_

    def spy(self, optimizer):
        seen.append(self.get_scale())
        return real_unscale(self, optimizer)
    monkeypatch.setattr(torch.amp.GradScaler, "unscale_", spy)
    caption.train_model(data_dir, out_dir)
    assert seen == [1024.0]
    state = saved_state(out_dir)
    assert state["step"] == 2 and state["scaler"]["scale"] in (1024.0, 512.0)
    lora = load(adapter_dir=saved_folder(out_dir), trainable=False)[0]
    assert all(torch.isfinite(p).all() for n, p in lora.named_parameters() if "lora_" in n)


class FakeUnsloth(types.ModuleType):
    """unsloth's FastVisionModel API over the tiny model: records what caption.py asks of it."""
    def __init__(self):
        super().__init__("unsloth")
        self.calls = []
        fake = self

        class FastVisionModel:
            @staticmethod
            def from_pretrained(name, **kwargs):
                fake.calls.append(("from_pretrained", name, kwargs))
                model, processor = caption.build_tiny_model()
                if os.path.isdir(name) and os.path.exists(os.path.join(name, "adapter_config.json")):
                    from peft import PeftModel
                    model = PeftModel.from_pretrained(model, name)
                return model.to(kwargs["dtype"]), processor

            @staticmethod
            def get_peft_model(model, **kwargs):
                fake.calls.append(("get_peft_model", kwargs))
                from peft import LoraConfig, get_peft_model
                return get_peft_model(model, LoraConfig(r=kwargs["r"], lora_alpha=kwargs["lora_alpha"],
                                                        target_modules=caption.LANGUAGE_TARGETS))

            @staticmethod
            def for_training(model):
                fake.calls.append(("for_training",))

            @staticmethod
            def for_inference(model):
                fake.calls.append(("for_inference",))
        self.FastVisionModel = FastVisionModel


def test_the_unsloth_backend_gets_the_precision_and_trains_with_the_scaler(tiny, data_dir, tmp_path, monkeypatch):
    fake = FakeUnsloth()
    monkeypatch.setitem(sys.modules, "unsloth", fake)
    monkeypatch.setattr(caption, "backend", "unsloth")
    monkeypatch.setattr(caption, "precision", "fp16")
    out_dir = str(tmp_path / "out")
    caption.train_model(data_dir, out_dir)
    assert fake.calls[0][0] == "from_pretrained" and fake.calls[0][2]["dtype"] == torch.float16
    assert fake.calls[0][2]["load_in_4bit"] is True
    assert fake.calls[1][0] == "get_peft_model" and fake.calls[1][1]["finetune_vision_layers"] is True
    assert ("for_inference",) in fake.calls and fake.calls[-1] in (("for_training",), ("for_inference",))
    state = saved_state(out_dir)
    assert state["step"] == 2 and state["scaler"]["scale"] > 0 and state["scaler"]["_growth_tracker"] >= 0


def on_a_gpu(monkeypatch, capability):
    """What choose_backend and load_model see on a CUDA machine of this capability (the model itself stays on the
    CPU: load_transformers is replaced by the tiny model's)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(caption, "load_transformers", lambda *args: caption.build_tiny_model())


def test_a_broken_unsloth_falls_back_to_transformers_with_one_line(tmp_path, monkeypatch, capsys):
    """unsloth that fails on import (or is not installed): under auto one line and transformers + peft; asked for by
    name, one line and stop."""
    package = tmp_path / "unsloth"
    package.mkdir()
    (package / "__init__.py").write_text("raise RuntimeError('Unsloth: your GPU is too old\\nmore detail')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "unsloth", raising=False)
    on_a_gpu(monkeypatch, (7, 5))
    monkeypatch.setattr(caption, "model_name", "some/model")
    assert caption.choose_backend(use_cuda=True) == "unsloth"          # capability 7.5: unsloth is tried
    assert caption.load_model(trainable=False)[2] == "transformers"
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0] == ("note: unsloth failed to load some/model (RuntimeError: Unsloth: your GPU is too old); "
                      "using transformers + peft")
    monkeypatch.setattr(caption, "backend", "unsloth")
    with pytest.raises(ValueError, match=r"^--backend=unsloth but unsloth failed to load some/model \(RuntimeError: "
                                         r"Unsloth: your GPU is too old\)$"):
        caption.load_model(trainable=False)
    monkeypatch.setattr(caption, "backend", "auto")
    monkeypatch.setitem(sys.modules, "unsloth", None)        # not installed at all
    assert caption.load_model(trainable=False)[2] == "transformers"
    assert capsys.readouterr().out.startswith("note: unsloth failed to load some/model (ModuleNotFoundError")
    assert caption.choose_backend(use_cuda=False) == "transformers"


def test_auto_picks_unsloth_only_from_capability_7(monkeypatch):
    """Kaggle's P100 (6.0): unsloth imports but its Triton kernels cannot run; auto takes transformers, which runs
    there (bitsandbytes' NF4 works from 6.0). A T4 (7.5) gets unsloth."""
    monkeypatch.setitem(sys.modules, "unsloth", FakeUnsloth())
    on_a_gpu(monkeypatch, (6, 0))
    assert caption.choose_backend(use_cuda=True) == "transformers"
    on_a_gpu(monkeypatch, (7, 5))
    assert caption.choose_backend(use_cuda=True) == "unsloth"
    monkeypatch.setattr(caption, "tiny", True)
    assert caption.choose_backend(use_cuda=True) == "transformers"   # --tiny: transformers


def test_unsloth_failing_to_load_the_model_falls_back_under_auto_and_stops_by_name(data_dir, monkeypatch, capsys):
    """A failure deep inside unsloth's loading (Triton, a download): under auto one line and transformers + peft;
    with --backend=unsloth one line naming the model, through main."""
    fake = FakeUnsloth()

    def broken(name, **kwargs):
        raise RuntimeError("Unsloth: Triton failed to compile\nlong traceback")
    fake.FastVisionModel.from_pretrained = staticmethod(broken)
    monkeypatch.setitem(sys.modules, "unsloth", fake)
    on_a_gpu(monkeypatch, (7, 5))
    for name in ("predict", "model_name", "backend", "data_dir"):   # main's overrides are undone after the test
        monkeypatch.setattr(caption, name, getattr(caption, name))
    monkeypatch.setattr(caption, "model_name", "some/model")
    model, processor, used, _ = caption.load_model(trainable=False)
    assert used == "transformers" and processor is not None
    out = capsys.readouterr().out.splitlines()
    assert out[0] == ("note: unsloth failed to load some/model (RuntimeError: Unsloth: Triton failed to compile); "
                      "using transformers + peft")
    assert out[1].startswith("backend transformers on cpu")
    monkeypatch.setattr(caption, "write_submission", lambda *args: caption.load_model(trainable=False))
    with pytest.raises(SystemExit) as stop:
        caption.main(["--predict", "--backend=unsloth", "--model_name=some/model", f"--data_dir={data_dir}"])
    assert str(stop.value) == ("error: --backend=unsloth but unsloth failed to load some/model (RuntimeError: "
                               "Unsloth: Triton failed to compile)")


@pytest.mark.parametrize("first", ["bf16", "fp32"])
def test_a_run_resumes_under_another_precision(tiny, data_dir, tmp_path, monkeypatch, capsys, first):
    """Started where auto picks bf16 (an A100, an AMX CPU) or fp32 (a plain CPU), resumed on a T4 (fp16): the run
    goes on with one line, and the gradient scaler, which the first run did not have, starts fresh."""
    monkeypatch.setattr(caption, "load_in_4bit", False)
    monkeypatch.setattr(caption, "max_steps", 3)
    monkeypatch.setattr(caption, "max_minutes", 1e-9)          # stop after each step
    monkeypatch.setattr(caption, "precision", first)
    out_dir = str(tmp_path / "out")
    caption.train_model(data_dir, out_dir)
    assert saved_state(out_dir)["precision"] == first and saved_state(out_dir)["scaler"] == {}
    first_folder = saved_folder(out_dir)
    monkeypatch.setattr(caption, "precision", "fp16")
    capsys.readouterr()
    caption.train_model(data_dir, out_dir)
    out = capsys.readouterr().out
    assert f"resuming from {first_folder} at step 1 (saved under {first}, now fp16)" in out
    state = saved_state(out_dir)
    assert state["step"] == 2 and state["precision"] == "fp16" and state["scaler"]["scale"] in (65536.0, 32768.0)
    monkeypatch.setattr(caption, "precision", first)           # and back: the scaler's state is not needed there
    caption.train_model(data_dir, out_dir)
    assert saved_state(out_dir)["step"] == 3


# ----------------------------------------------------------------------------- the run a user starts
def test_training_draws_every_caption_of_an_image(tiny, tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from test_caption import jpeg
    references = {"red": ["A red square .", "Crimson tile .", "Scarlet patch ."],
                  "blue": ["A blue square .", "Navy tile .", "Azure patch ."]}
    pq.write_table(pa.table({"image": [{"bytes": jpeg(COLOURS[c]), "path": c} for c in references],
                             "caption": [r[0] for r in references.values()],
                             "references": list(references.values())}), tmp_path / "train_data.parquet")
    write_parquet(tmp_path / "valid_data.parquet", 1)
    monkeypatch.setattr(caption, "load_in_4bit", False)
    monkeypatch.setattr(caption, "max_steps", 8)
    drawn = []
    real_make_batch = caption.make_batch

    def spy(processor, images, captions=None):
        if captions is not None:
            drawn.extend(zip([im.getpixel((0, 0)) for im in images], captions))
        return real_make_batch(processor, images, captions)
    monkeypatch.setattr(caption, "make_batch", spy)
    caption.train_model(str(tmp_path), str(tmp_path / "out"))
    assert len(drawn) == 16
    by_colour = {}
    for pixel, text in drawn:
        colour = "red" if pixel[0] > 150 else "blue"
        by_colour.setdefault(colour, set()).add(text)
    assert by_colour == {colour: set(texts) for colour, texts in references.items()}
    # and the choice is seeded: the same run draws the same captions
    caption.train_model(str(tmp_path), str(tmp_path / "again"))
    assert drawn[16:] == drawn[:16]


def test_a_file_with_one_row_per_caption_becomes_one_image_with_all_its_captions(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from test_caption import jpeg
    red, blue = jpeg(COLOURS["red"]), jpeg(COLOURS["blue"])
    pq.write_table(pa.table({"image": [red, blue, red, red], "caption": ["A red one .", "A blue one .",
                                                                        "Red square .", "A red one ."]}),
                   tmp_path / "t.parquet")
    rows = caption.load_split(str(tmp_path / "t.parquet"), need_caption=True)
    assert [r["references"] for r in rows] == [["A red one .", "Red square ."], ["A blue one ."]]


def test_step_0_validation_save_every_and_all_validation_images(tiny, data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(caption, "load_in_4bit", False)
    monkeypatch.setattr(caption, "val_samples", 0)
    monkeypatch.setattr(caption, "max_steps", 5)
    monkeypatch.setattr(caption, "save_every", 2)
    monkeypatch.setattr(caption, "eval_every", 4)
    monkeypatch.setattr(caption, "max_new_tokens", 2)
    saved = []
    real_save = caption.save_checkpoint
    monkeypatch.setattr(caption, "save_checkpoint", lambda *args: (saved.append(args[4]), real_save(*args))[1])
    caption.train_model(data_dir, str(tmp_path / "out"))
    out = capsys.readouterr().out
    assert "step 0: validation BLEU" in out and out.index("step 0: validation") < out.index("step 1/5")
    assert "on 2 images" in out                                  # all of valid_data.parquet
    assert saved == [0, 2, 4, 5]       # step 0, save_every, the last (a new best at 4 or 5 is saved there anyway)


def test_config_block_defaults():
    """Without a fixture the module holds the file's own values."""
    assert caption.save_every == 20 and caption.val_samples == 0 and caption.eval_every == 50
    assert caption.precision == "auto" and caption.load_in_4bit and caption.gradient_checkpointing


def test_train_predict_frees_the_trained_model_and_reads_the_test_file_once(tiny, data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(caption, "load_in_4bit", False)
    models = []
    real_load = caption.load_model

    def spy(*args, **kwargs):
        alive = [ref for ref in models if ref() is not None]
        assert not alive, "the first model is still in memory when the second one loads"
        result = real_load(*args, **kwargs)
        models.append(weakref.ref(result[0]))
        return result
    monkeypatch.setattr(caption, "load_model", spy)
    reads, real_split = [], caption.load_split
    monkeypatch.setattr(caption, "load_split", lambda path, **kw: reads.append(os.path.basename(path)) or
                        real_split(path, **kw))
    for name in ("train", "predict", "data_dir", "out_dir", "submission"):
        monkeypatch.setattr(caption, name, getattr(caption, name))   # main's overrides are undone after the test
    caption.main(["--train", "--predict", f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'out'}",
                  f"--submission={tmp_path / 's.json'}"])
    assert len(models) == 2 and len(json.loads((tmp_path / "s.json").read_text())) == 3
    assert reads.count("test_data.parquet") == 1        # read once, before training, and captioned after it

"""
Image captioning by LoRA fine-tuning of Llama 3.2 Vision 11B (homework part 2-3), scored by BLEU (bleu.py).
Unsloth's FastVisionModel on a CUDA machine with unsloth installed; otherwise transformers'
MllamaForConditionalGeneration with peft LoRA on the same projections. Both load the base in 4-bit NF4 (QLoRA;
bitsandbytes >= 0.50 quantizes on the CPU too) and train under autocast: bf16 from CUDA capability 8.0, fp16 with a
gradient scaler below (a T4 is 7.5), fp32 on a CPU without native bf16. The base stays frozen; only the LoRA
matrices train. No Trainer: a plain loop.

    python caption.py --train --data_dir=data/caption --out_dir=out/caption --max_steps=250
    python caption.py --predict --data_dir=data/caption --out_dir=out/caption --submission=submission.json
    python caption.py --train --tiny --max_steps=20     # a tiny random Mllama built in code: runs on a CPU in seconds

Training validates at step 0 (the zero-shot BLEU) and every eval_every steps, and writes out_dir/adapter (the LoRA
adapter with the best validation BLEU, with the settings it was trained with: --predict uses those) and
out_dir/last (adapter, optimizer and scaler state every save_every steps: run the same command again to resume).
Ctrl-C or SIGTERM saves out_dir/last, then exits; a non-finite loss stops without touching it.

References:
  LoRA: Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models" (arXiv:2106.09685).
  QLoRA: Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs" (arXiv:2305.14314): a frozen 4-bit
    NormalFloat (NF4) base with double quantization, both used here; its paged optimizers are not.
  8-bit AdamW (--optimizer_name=adamw_8bit): Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization".
  Llama 3.2 Vision: Llama Team 2024, "The Llama 3 Herd of Models" (arXiv:2407.21783), section 7: a vision encoder
    whose features reach the language model through gated cross-attention layers.
  Gradient checkpointing: Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost" (arXiv:1604.06174).
"""
import functools
import gc
import io
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import time

import pyarrow.parquet as pq
import torch
from PIL import Image

from bleu import config_block, corpus_bleu, parse_overrides

# -----------------------------------------------------------------------------
# configuration: every constant below can be overridden as --name=value
train = False           # fine-tune on data_dir/train_data.parquet, validate on valid_data.parquet
predict = False         # caption data_dir/test_data.parquet into submission
tiny = False            # a tiny randomly initialised Mllama and processor built in code (no download)
data_dir = "data/caption"  # holds train_data.parquet, valid_data.parquet, test_data.parquet
out_dir = "out/caption"    # out_dir/adapter: the best adapter; out_dir/last: the resume point
submission = "submission.json"  # --predict writes [{"idx": ..., "output": caption}] here
model_name = "unsloth/Llama-3.2-11B-Vision-Instruct"  # a Hub id or a local folder (also --model=...)
backend = "auto"        # auto | unsloth | transformers (auto: unsloth on CUDA without --tiny where it imports)
load_in_4bit = True     # 4-bit NF4 base weights (QLoRA); vision encoder, projector and lm_head stay 16-bit
precision = "auto"      # auto | bf16 | fp16 | fp32 autocast (auto: bf16 where native, fp16 + scaler on older GPUs)
gradient_checkpointing = True  # recompute activations in backward, language and vision layers (unsloth: always)
instruction = "Write a one-sentence caption for this image."  # the user turn's text, after the image
# LoRA (Hu et al. 2021): W + (alpha / r) * B A on every attention and MLP projection of the language model
lora_r = 16             # the rank r of B (d x r) and A (r x k)
lora_alpha = 16         # the update B A is scaled by alpha / r
lora_dropout = 0.0      # dropout on the input of A (training only)
finetune_vision = True  # LoRA on the vision encoder's projections too (the unsloth notebook does)
# training
max_steps = 250         # optimizer steps; 0 = epochs over the training images
epochs = 1              # passes over the training images, where max_steps = 0
batch_size = 2          # images per forward pass
grad_accum = 4          # forward passes per optimizer step: effective batch = batch_size * grad_accum
lr = 2e-4               # peak learning rate: linear warmup to it, then linear decay to 0 (learning_rate)
warmup_steps = 5        # steps of linear warmup
weight_decay = 0.01     # AdamW's decoupled weight decay, on the LoRA matrices
grad_clip = 1.0         # the gradient's global norm is clipped to this
optimizer_name = "adamw"  # adamw | adamw_8bit (bitsandbytes)
eval_every = 50         # steps between validation BLEU checks (also at step 0 and at the end)
save_every = 20         # steps between resume points in out_dir/last (a T4 step takes about 30 s)
val_samples = 0         # validation images captioned for BLEU (0 = all)
max_new_tokens = 48     # caption length limit when generating
predict_batch_size = 8  # images per generate() call, in --predict and in validation
log_every = 10          # steps between loss lines
max_minutes = 0.0       # stop cleanly (resume point saved in out_dir/last) after this long; 0 = no limit
seed = 3407             # new LoRA weights, the --tiny model's weights, the order of images and captions
num_threads = 2         # CPU threads for torch (torch.set_num_threads)
# -----------------------------------------------------------------------------

CHECKS = {
    "backend": ("auto", "unsloth", "transformers"),
    "precision": ("auto", "bf16", "fp16", "fp32"),
    "optimizer_name": ("adamw", "adamw_8bit"),
    "lora_r": (lambda v: v >= 1, "an integer >= 1"),
    "lora_alpha": (lambda v: v > 0, "an integer > 0"),
    "lora_dropout": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "max_steps": (lambda v: v >= 0, "an integer >= 0"),
    "epochs": (lambda v: v >= 1, "an integer >= 1"),
    "batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "grad_accum": (lambda v: v >= 1, "an integer >= 1"),
    "lr": (lambda v: v > 0, "a number > 0"),
    "warmup_steps": (lambda v: v >= 0, "an integer >= 0"),
    "weight_decay": (lambda v: v >= 0, "a number >= 0"),
    "grad_clip": (lambda v: v > 0, "a number > 0"),
    "eval_every": (lambda v: v >= 1, "an integer >= 1"),
    "save_every": (lambda v: v >= 1, "an integer >= 1"),
    "val_samples": (lambda v: v >= 0, "an integer >= 0"),
    "max_new_tokens": (lambda v: v >= 1, "an integer >= 1"),
    "predict_batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "log_every": (lambda v: v >= 1, "an integer >= 1"),
    "max_minutes": (lambda v: v >= 0, "a number >= 0"),
    "num_threads": (lambda v: v >= 1, "an integer >= 1"),
}
# Settings saved beside every adapter (save_adapter). --predict rebuilds the adapter's base and prompt from
# MODEL_KEYS; a resumed run must match all of RESUME_KEYS (batch_size and grad_accum fix the examples of each step).
MODEL_KEYS = ("model_name", "tiny", "instruction", "lora_r", "lora_alpha", "lora_dropout", "finetune_vision", "seed")
RESUME_KEYS = MODEL_KEYS + ("batch_size", "grad_accum")
CONFIG_FILE = "caption_config.json"
# The oldest versions this file was tested with (README; requirements.txt says the same); older ones stop with one
# line on the transformers backend (unsloth pins its own): transformers before 4.56 has no dtype= keyword and 4.x
# has no MllamaImageProcessorPil, bitsandbytes before 0.50 cannot quantize on the CPU.
VERSION_FLOORS = {"transformers": "5.23", "peft": "0.21", "bitsandbytes": "0.50"}

EOT = "<|eot_id|>"      # Llama 3's end of turn: the assistant's caption ends with it, generation stops on it
IGNORE_INDEX = -100     # cross_entropy skips these label positions
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def settings():
    """The configuration block's current values as a dict: what the functions below are given."""
    return {name: globals()[name] for name, _ in config_block(__file__) if name}


def one_line(error):
    """An exception as 'Type: first line of its message', for the one-line stops."""
    lines = str(error).splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


# ----------------------------------------------------------------------------- precision
def cpu_has_bf16():
    """True where the CPU computes bfloat16 natively: AMX or AVX512-BF16 in Linux's /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def choose_precision(requested, device_type):
    """The autocast precision for `requested` (--precision) on this device, and why: auto is bf16 where the hardware
    computes it natively (CUDA capability >= 8.0, i.e. Ampere and later; CPUs with AMX or AVX512-BF16), fp16 with a
    gradient scaler on older GPUs (a T4, 7.5, only emulates bf16: its convolutions then skip cuDNN and the tensor
    cores), and fp32 elsewhere."""
    if requested != "auto":
        return requested, "asked for"
    if device_type == "cuda":
        major, minor = torch.cuda.get_device_capability()
        if major >= 8:
            return "bf16", f"CUDA capability {major}.{minor} computes bfloat16 natively"
        return "fp16", f"CUDA capability {major}.{minor} has no native bfloat16: float16 with a gradient scaler"
    if device_type == "cpu" and cpu_has_bf16():
        return "bf16", "this CPU computes bfloat16 natively (AMX or AVX512-BF16)"
    return "fp32", f"no native bfloat16 on this {device_type}"


def default_device_type():
    return "cuda" if torch.cuda.is_available() else "cpu"


def autocast(device_type, precision_name):
    return torch.autocast(device_type, dtype=DTYPES[precision_name], enabled=precision_name != "fp32")


# ----------------------------------------------------------------------------- data
class CaptionDataError(ValueError):
    """Bad input; the message names the file and the row."""


def row_captions(row, name, row_number):
    """Every caption of a training row: its `caption`, then its `references` (a list); none, or an empty one, is a
    CaptionDataError naming the field."""
    captions = [row["caption"]] if "caption" in row else []
    if "references" in row:
        if not isinstance(row["references"], list):
            raise CaptionDataError(f"{name}: row {row_number}: field 'references' must be a list of captions")
        captions += row["references"]
    if not captions or not all(isinstance(text, str) and text.strip() for text in captions):
        field = "caption" if "caption" in row and not (isinstance(row["caption"], str) and
                                                       row["caption"].strip()) else "references"
        raise CaptionDataError(f"{name}: row {row_number}: field '{field}' is empty")
    return captions


def load_split(path, need_caption):
    """Rows of a homework parquet as dicts of its columns, `image` decoded to PIL RGB. Training files carry
    `caption` and/or `references` (a list of captions); rows with the same image bytes (a file with one row per
    caption) become one row whose `references` holds all their captions and `caption` the first. The image column
    is a struct {bytes, path} or plain binary. Anything missing or unreadable is a CaptionDataError (file, row,
    field)."""
    name = os.path.basename(path)
    try:
        table = pq.read_table(path)
    except FileNotFoundError:
        raise CaptionDataError(f"{path}: file not found") from None
    except Exception as e:  # pyarrow raises several kinds for a file that is not parquet
        raise CaptionDataError(f"{name}: cannot read parquet ({one_line(e)})") from None
    if "image" not in table.column_names:
        raise CaptionDataError(f"{name}: missing column 'image' (has {table.column_names})")
    if need_caption and not {"caption", "references"} & set(table.column_names):
        raise CaptionDataError(f"{name}: missing column 'caption' (or 'references') (has {table.column_names})")
    if not need_caption and "idx" not in table.column_names:
        raise CaptionDataError(f"{name}: missing column 'idx' (has {table.column_names})")
    rows, row_of_image = [], {}
    for row_number, row in enumerate(table.to_pylist()):
        image = row["image"]
        data = image.get("bytes") if isinstance(image, dict) else image
        if not data:
            raise CaptionDataError(f"{name}: row {row_number}: field 'image' has no bytes")
        if need_caption:
            captions = row_captions(row, name, row_number)
            if data in row_of_image:        # another caption of an image seen before
                known = row_of_image[data]["references"]
                known += [text for text in captions if text not in known]
                continue
        try:
            with Image.open(io.BytesIO(data)) as opened:
                row["image"] = opened.convert("RGB")
        except Exception as e:
            raise CaptionDataError(f"{name}: row {row_number}: cannot decode image ({one_line(e)})") from None
        if need_caption:
            row["references"] = list(dict.fromkeys(captions))   # unique, in order; the `caption` first
            row["caption"] = row["references"][0]
            row_of_image[data] = row
        if "idx" in row and not isinstance(row["idx"], int):
            raise CaptionDataError(f"{name}: row {row_number}: field 'idx' must be an integer, got {row['idx']!r}")
        rows.append(row)
    if not rows:
        raise CaptionDataError(f"{name}: no rows")
    return rows


# ----------------------------------------------------------------------------- model
# peft target modules: every attention (self and cross) and MLP projection of the language model, and
# (finetune_vision) of the vision encoder; the same set unsloth's get_peft_model picks for vision models.
LANGUAGE_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
VISION_TARGETS = r".*vision_model.*\.(q_proj|k_proj|v_proj|o_proj|fc1|fc2)"
# Kept out of 4-bit: NF4 of everything degrades this model (unsloth measured error spikes), and these three are
# small next to the 8.7 B language-layer weights (0.9 B, 0.03 B, 0.5 B parameters). transformers 5 matches a name
# from the module path's start or as a suffix ("model.vision_model"), 4.x as a substring ("vision_model").
SKIP_4BIT = ["vision_model", "model.vision_model", "multi_modal_projector", "lm_head"]


def check_versions():
    from packaging.version import Version
    import importlib.metadata
    for package, floor in VERSION_FLOORS.items():
        try:
            found = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            raise SystemExit(f"error: caption.py needs {package} >= {floor}: pip install -r requirements.txt") from None
        if Version(found) < Version(floor):
            raise SystemExit(f"error: caption.py needs {package} >= {floor}, found {found}: pip install -U {package}")


def choose_backend(requested, use_cuda, is_tiny):
    """unsloth where asked, or (auto) on CUDA, without --tiny, when it imports; a broken install falls back to
    transformers with one line under auto and stops with one line when asked for by name."""
    if requested == "transformers" or (requested == "auto" and (not use_cuda or is_tiny)):
        return "transformers"
    try:
        import unsloth  # noqa: F401  (it patches transformers on import: import it before loading the model)
    except Exception as e:  # a missing or broken install: ImportError, or anything its import raises
        if requested == "unsloth":
            raise SystemExit(f"error: --backend=unsloth but unsloth does not import ({one_line(e)})") from None
        print(f"note: unsloth does not import ({one_line(e)}); using transformers + peft")
        return "transformers"
    return "unsloth"


def load_base(c, precision_name, use_cuda):
    """The frozen base and its processor. 16-bit weights are stored in the autocast dtype (fp16 on a T4), fp32 when
    precision is fp32. With load_in_4bit, the language layers are QLoRA's (Dettmers et al. 2023) 4-bit NormalFloat
    (NF4) with double quantization (the per-block scales quantized too), computing in the autocast dtype."""
    from transformers import AutoProcessor, BitsAndBytesConfig, MllamaForConditionalGeneration
    dtype = DTYPES[precision_name]
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype,
        llm_int8_skip_modules=SKIP_4BIT) if c["load_in_4bit"] else None
    device_map = {"": 0} if use_cuda else None
    if c["tiny"]:
        base, processor = build_tiny_model(c["seed"])   # defined at the end of the file: not part of the lesson
        if quantization is None:
            base = base.to(dtype)
        else:   # bitsandbytes quantizes while loading: save the tiny model and load it back through it
            with tempfile.TemporaryDirectory() as folder:
                base.save_pretrained(folder)
                base = MllamaForConditionalGeneration.from_pretrained(folder, quantization_config=quantization,
                                                                      dtype=dtype, device_map=device_map)
                base.generation_config.pad_token_id = processor.tokenizer.pad_token_id
        if use_cuda and quantization is None:
            base = base.cuda()
        return base, processor
    try:
        base = MllamaForConditionalGeneration.from_pretrained(c["model_name"], quantization_config=quantization,
                                                              dtype=dtype, device_map=device_map)
        processor = AutoProcessor.from_pretrained(c["model_name"])
    except OSError as e:
        raise SystemExit(f"error: cannot load model {c['model_name']!r} ({one_line(e)})") from None
    if processor.tokenizer.pad_token is None:   # Llama 3's reserved padding token, as unsloth uses it
        processor.tokenizer.pad_token = "<|finetune_right_pad_id|>"
    return base, processor


def checkpointed_forward(module, *args, **kwargs):
    """The forward that checkpoint_vision_layers (below) gives a layer: its own, checkpointed while training."""
    if module.training and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(module._unchecked_forward, *args, use_reentrant=False, **kwargs)
    return module._unchecked_forward(*args, **kwargs)


def checkpoint_vision_layers(model):
    """Non-reentrant activation checkpointing of every MllamaVisionEncoderLayer (transformers checkpoints only the
    language layers; unchecked, one 11B vision layer with LoRA keeps about 300 MiB of activations per image under
    16-bit autocast: README, "Memory and time on a T4")."""
    from transformers.models.mllama.modeling_mllama import MllamaVisionEncoderLayer
    for module in model.modules():
        if isinstance(module, MllamaVisionEncoderLayer) and "_unchecked_forward" not in module.__dict__:
            module._unchecked_forward = module.forward
            module.forward = functools.partial(checkpointed_forward, module)


def prepare_for_training(base, c, precision_name):
    """Freeze the base, prepare a 4-bit one with peft (norms in fp32), turn on non-reentrant gradient checkpointing
    of the language layers (transformers) and of the vision layers (here: transformers does not), and store the big
    frozen 16-bit matrices back in the autocast dtype (peft upcasts them all to fp32: +3.9 GB on the 11B)."""
    for p in base.parameters():
        p.requires_grad_(False)
    # non-reentrant: the reentrant default crashes on the cross-attention states (issue 12)
    checkpointing_kwargs = {"use_reentrant": False}
    if getattr(base, "is_loaded_in_4bit", False):
        from peft import prepare_model_for_kbit_training
        prepare_model_for_kbit_training(base, use_gradient_checkpointing=c["gradient_checkpointing"],
                                        gradient_checkpointing_kwargs=checkpointing_kwargs)
        dtype = DTYPES[precision_name]
        if dtype != torch.float32:
            for module in base.modules():
                if type(module) in (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv2d):
                    module.to(dtype)
    elif c["gradient_checkpointing"]:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing_kwargs)
    if c["gradient_checkpointing"]:
        checkpoint_vision_layers(base)


def remove_input_grad_hooks(model):
    """Drop the hooks that make embedding outputs require grad (transformers and peft add them for reentrant
    checkpointing; in transformers 5 also on the vision patch embedding): with non-reentrant checkpointing they only
    make backward run through the frozen vision tower, and storing its graph costs gigabytes."""
    for module in model.modules():
        for key, hook in list(module._forward_hooks.items()):
            if getattr(hook, "__name__", "") in ("make_inputs_require_grads", "make_inputs_require_grad"):
                del module._forward_hooks[key]


def load_transformers(c, adapter_dir, trainable, precision_name, use_cuda):
    """The base through transformers (load_base), prepared for training where trainable, with new LoRA on
    LANGUAGE_TARGETS (and VISION_TARGETS) or the saved adapter in adapter_dir."""
    check_versions()
    from peft import LoraConfig, PeftModel, get_peft_model
    base, processor = load_base(c, precision_name, use_cuda)
    if trainable:
        prepare_for_training(base, c, precision_name)
    if adapter_dir:
        try:
            model = PeftModel.from_pretrained(base, adapter_dir, is_trainable=trainable)
        except Exception as e:
            raise SystemExit(f"error: cannot load the adapter in {adapter_dir} ({one_line(e)})") from None
    else:
        targets = f"({LANGUAGE_TARGETS}|{VISION_TARGETS})" if c["finetune_vision"] else LANGUAGE_TARGETS
        model = get_peft_model(base, LoraConfig(r=c["lora_r"], lora_alpha=c["lora_alpha"],
                                                lora_dropout=c["lora_dropout"], target_modules=targets, bias="none"))
    if trainable:
        remove_input_grad_hooks(model)
    return model, processor


def set_mode(model, used_backend, training):
    """unsloth patches its model for training or for fast generation; switch between them around validation."""
    if used_backend == "unsloth":
        from unsloth import FastVisionModel
        (FastVisionModel.for_training if training else FastVisionModel.for_inference)(model)


def load_unsloth(c, adapter_dir, trainable, precision_name):
    """The same model through unsloth (GPU only): the base in 4-bit where load_in_4bit, its LoRA on the same
    projections, its gradient checkpointing (vision layers included; always on: gradient_checkpointing is not read).
    An adapter folder loads through from_pretrained, as in unsloth's notebooks."""
    from unsloth import FastVisionModel
    model, processor = FastVisionModel.from_pretrained(adapter_dir or c["model_name"], load_in_4bit=c["load_in_4bit"],
                                                       dtype=DTYPES[precision_name],
                                                       use_gradient_checkpointing="unsloth")
    if adapter_dir is None:
        model = FastVisionModel.get_peft_model(
            model, finetune_vision_layers=c["finetune_vision"], finetune_language_layers=True,
            finetune_attention_modules=True, finetune_mlp_modules=True, r=c["lora_r"], lora_alpha=c["lora_alpha"],
            lora_dropout=c["lora_dropout"], bias="none", random_state=c["seed"])
    set_mode(model, "unsloth", training=trainable)
    return model, processor


def load_model(c=None, adapter_dir=None, trainable=True, precision_name=None):
    """(model with LoRA, processor, backend name). c: settings (default: the configuration block); adapter_dir: a
    saved adapter to load instead of new LoRA; trainable: prepare for training (k-bit preparation, checkpointing);
    precision_name: bf16 | fp16 | fp32 (default: choose_precision's pick for this machine)."""
    c = c or settings()
    use_cuda = torch.cuda.is_available()
    precision_name = precision_name or choose_precision(c["precision"], default_device_type())[0]
    used_backend = choose_backend(c["backend"], use_cuda, c["tiny"])
    if used_backend == "unsloth":
        model, processor = load_unsloth(c, adapter_dir, trainable, precision_name)
    else:
        model, processor = load_transformers(c, adapter_dir, trainable, precision_name, use_cuda)
    if trainable:
        for p in model.parameters():       # fp32 LoRA: the gradient scaler refuses fp16 gradients
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()
    return model, processor, used_backend


# ----------------------------------------------------------------------------- prompts and batches
def chat_prompt(processor, text_instruction=None):
    """The user turn (image + instruction) and the assistant header, in the model's own chat template."""
    text = instruction if text_instruction is None else text_instruction
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def make_batch(processor, images, captions=None, text_instruction=None):
    """Processor outputs for images with the prompt; with captions, the caption and <|eot_id|> follow the prompt
    and `labels` keeps only those tokens: prompt, image token and padding are IGNORE_INDEX (-100)."""
    tokenizer = processor.tokenizer
    prompt = chat_prompt(processor, text_instruction)
    texts = [prompt] * len(images) if captions is None else [prompt + text.strip() + EOT for text in captions]
    # training pads on the right; generation pads on the left so every prompt ends where generation begins
    tokenizer.padding_side = "right" if captions is not None else "left"
    batch = processor(text=texts, images=[[image] for image in images], padding=True, return_tensors="pt",
                      add_special_tokens=False)  # the chat template already starts with <|begin_of_text|>
    if captions is not None:
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if batch["input_ids"][0, :len(prompt_ids)].tolist() != prompt_ids:
            raise RuntimeError("the prompt does not tokenize to the same ids inside prompt + caption")
        labels = batch["input_ids"].clone()
        labels[:, :len(prompt_ids)] = IGNORE_INDEX
        labels[batch["attention_mask"] == 0] = IGNORE_INDEX
        batch["labels"] = labels
    return batch


# ----------------------------------------------------------------------------- captions and validation BLEU
# Lines that introduce a caption rather than being one: "Here is a one-sentence caption for this image:".
PREAMBLE = re.compile(r"^(here\s+is|here's|sure|certainly|of course|okay|ok)\b.*|.*:\s*$", re.IGNORECASE)
# A label in front of the caption: "Caption:", "**Answer:**", "Image description -".
CAPTION_PREFIX = re.compile(r"^\s*(?:[*_#>\-\s]*)(?:one[- ]sentence\s+)?(?:image\s+)?(?:caption|answer|description)"
                            r"\s*(?:[*_]*\s*:\s*[*_]*|[*_]*\s*-\s+)", re.IGNORECASE)
# Words ending in '.' that do not end a sentence: titles, 'St.', initials, 'etc.' before a lower-case word.
ABBREVIATIONS = {"st", "mr", "mrs", "ms", "dr", "jr", "sr", "mt", "ft", "ave", "vs", "no", "etc", "approx", "inc",
                 "co", "jan", "feb", "aug", "sept", "oct", "nov", "dec", "u.s", "e.g", "i.e", "a.m", "p.m"}


def first_sentence(text):
    """text up to and including the first '.', '!' or '?' (and a closing quote after it) that ends a sentence:
    followed by a space or the end. A '.' does not end one before a lower-case word, after an ABBREVIATIONS word, or
    after a single letter (an initial) before a capital."""
    for match in re.finditer(r"[.!?][\"'”’)]*(?=\s|$)", text):
        end = match.end()
        rest = text[end:].lstrip()
        if match.group()[0] == ".":
            word = re.search(r"([\w.]+)\.$", text[:match.start() + 1])
            word = word.group(1).lower() if word else ""
            if word in ABBREVIATIONS or (len(word) == 1 and word.isalpha() and rest[:1].isupper()):
                continue
            if rest[:1].islower():
                continue
        return text[:end].strip()
    return text.strip()


def clean_caption(text):
    """A generated caption as one clean sentence: the first line that is not a preamble ('Here is a caption:'),
    without a 'Caption:' label, markdown emphasis or enclosing quotes, cut after its first sentence (an
    abbreviation such as 'St.' or an initial does not end it), single spaces, and ' .' at the end where it has no
    end punctuation. Why ' .' with a space: the Flickr8k captions of the homework's data were tokenized before
    release, with a space before the final period ('... in a big city .'; 90 % of the training captions end so,
    the rest have no period), and a model fine-tuned on them learns to end that way. Under sacrebleu's 13a tokenization
    (bleu.py's default, the validation BLEU here) 'city.' and 'city .' are the same tokens and only the period
    itself counts; under whitespace tokens (bleu.py --mode=nltk, as course scoring scripts often do) only the
    references' form ' .' matches."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    while len(lines) > 1 and PREAMBLE.match(lines[0]) and not CAPTION_PREFIX.match(lines[0] + " "):
        lines.pop(0)
    text = lines[0] if lines else ""
    # a preamble on the caption's own line: "Here is a caption: A dog runs."
    text = re.sub(r"^(here\s+is|here's|sure|certainly)\b[^:]*:\s+(?=\S)", "", text, flags=re.IGNORECASE)
    if CAPTION_PREFIX.match(text) and not CAPTION_PREFIX.sub("", text, count=1).strip(" *_\"'") and len(lines) > 1:
        text = lines[1]                                 # "**Caption:**" alone on its line, the caption below
    text = CAPTION_PREFIX.sub("", text, count=1)
    text = re.sub(r"(\*\*|__|\*|_)(.+?)\1", r"\2", text)        # markdown bold / italics
    text = text.strip(" *_#>\t")
    text = re.sub(r"\s+", " ", text)
    text = first_sentence(text)
    text = text.strip(" \"'“”‘’")                    # enclosing quotes
    if text and text[-1] not in ".!?":
        text += " ."
    return text


@torch.no_grad()
def generate_captions(model, processor, images, c, precision_name):
    """Greedy captions, cleaned (clean_caption), for a list of PIL images, in order, predict_batch_size at a time."""
    model.eval()
    device = next(model.parameters()).device
    captions = []
    for s in range(0, len(images), c["predict_batch_size"]):
        inputs = make_batch(processor, images[s:s + c["predict_batch_size"]],
                            text_instruction=c["instruction"]).to(device)
        with autocast(device.type, precision_name):
            output = model.generate(**inputs, max_new_tokens=c["max_new_tokens"], do_sample=False,
                                    eos_token_id=processor.tokenizer.convert_tokens_to_ids(EOT),
                                    pad_token_id=processor.tokenizer.pad_token_id)
        new_tokens = output[:, inputs["input_ids"].shape[1]:]
        captions += [clean_caption(t) for t in processor.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    return captions


def validate(model, processor, used_backend, rows, c, precision_name, step):
    """Corpus BLEU (bleu.py, sacrebleu's defaults) of greedy captions of rows against all references of each image,
    printed with one caption; leaves the model in training mode."""
    set_mode(model, used_backend, training=False)
    hypotheses = generate_captions(model, processor, [r["image"] for r in rows], c, precision_name)
    set_mode(model, used_backend, training=True)
    model.train()
    n_refs = max(len(r["references"]) for r in rows)
    # one stream per reference position; an image with fewer references repeats its first one
    streams = [[(r["references"] + r["references"][:1] * n_refs)[k] for r in rows] for k in range(n_refs)]
    score = corpus_bleu(hypotheses, streams).score
    print(f"step {step}: validation BLEU {score:.2f} on {len(rows)} images; e.g. {hypotheses[0]!r}")
    return score


# ----------------------------------------------------------------------------- resume points and adapters on disk
def check_writable_folder(folder, what):
    """Stop with one line, before any expensive work, where `folder` cannot be created or written."""
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write_test"):
            pass
    except OSError as e:
        raise SystemExit(f"error: {what} {folder!r} is not writable ({e.strerror or e})") from None


def swap_in(folder):
    """Replace folder by the complete folder.tmp so that a complete copy exists at every moment: folder -> folder.old,
    folder.tmp -> folder, then delete folder.old. recover() undoes a kill between any two of these."""
    old = folder + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(folder):
        os.replace(folder, old)
    os.replace(folder + ".tmp", folder)
    shutil.rmtree(old, ignore_errors=True)


def save_adapter(model, folder, c, resume_state=None):
    """model.save_pretrained into folder.tmp, the settings (RESUME_KEYS) beside it (and the resume state: optimizer,
    scaler, step, best BLEU), then swap it in."""
    temporary = folder + ".tmp"
    shutil.rmtree(temporary, ignore_errors=True)
    model.save_pretrained(temporary)
    with open(os.path.join(temporary, CONFIG_FILE), "w") as f:
        json.dump({key: c[key] for key in RESUME_KEYS}, f, indent=1)
    if resume_state is not None:  # the resume state goes last: its presence marks a complete folder
        torch.save(resume_state, os.path.join(temporary, "state.pt.tmp"))
        os.replace(os.path.join(temporary, "state.pt.tmp"), os.path.join(temporary, "state.pt"))
    else:
        open(os.path.join(temporary, "complete"), "w").close()
    swap_in(folder)


def is_complete(folder):
    """save_adapter finished writing folder: the file it writes last (state.pt or complete) is there."""
    return os.path.exists(os.path.join(folder, "state.pt")) or os.path.exists(os.path.join(folder, "complete"))


def recover(folder):
    """After a kill in save_adapter: the newest complete one of folder.tmp, folder, folder.old becomes folder."""
    temporary, old = folder + ".tmp", folder + ".old"
    if is_complete(temporary):              # finished writing, killed before or during the swap
        if os.path.exists(folder):
            shutil.rmtree(old, ignore_errors=True)
            os.replace(folder, old)
        os.replace(temporary, folder)
        print(f"recovered {folder} from {temporary} (the run was stopped while saving)")
    elif not os.path.exists(folder) and is_complete(old):
        os.replace(old, folder)
        print(f"recovered {folder} from {old}")
    shutil.rmtree(temporary, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)


def load_state(path):
    """The resume state; a damaged or foreign file stops with one line naming it (weights_only: a crafted pickle
    in it never runs)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SystemExit(f"error: {path} is damaged or not a caption.py resume state ({one_line(e)}); delete "
                         f"{os.path.dirname(path)} to start again from step 0") from None


def state_step(folder):
    """The step of the resume point in folder, or '?' where it cannot be read (for the non-finite loss message)."""
    try:
        return torch.load(os.path.join(folder, "state.pt"), map_location="cpu", weights_only=True)["step"]
    except Exception:
        return "?"


def read_config(folder):
    """The settings saved beside an adapter (save_adapter), {} where there are none; a damaged file stops."""
    path = os.path.join(folder, CONFIG_FILE)
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            saved = json.load(f)
        if not isinstance(saved, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        raise SystemExit(f"error: {path} is damaged ({e})") from None
    return saved


# ----------------------------------------------------------------------------- training
def learning_rate(step, total_steps, c):
    """The learning rate of step (0-based): linear warmup from lr / warmup_steps to lr over the first warmup_steps
    steps, then linear decay that reaches zero just after the last step: the unsloth notebook's "linear" schedule
    (transformers' get_linear_schedule_with_warmup), except that there the first step's rate is 0."""
    if step < c["warmup_steps"]:
        return c["lr"] * (step + 1) / c["warmup_steps"]
    return c["lr"] * max(0.0, (total_steps - step) / max(1, total_steps - c["warmup_steps"]))


def make_optimizer(parameters, c):
    """AdamW (Loshchilov & Hutter 2019, "Decoupled Weight Decay Regularization"), or its 8-bit-state version."""
    if c["optimizer_name"] == "adamw_8bit":
        import bitsandbytes as bnb
        return bnb.optim.AdamW8bit(parameters, lr=c["lr"], weight_decay=c["weight_decay"])
    return torch.optim.AdamW(parameters, lr=c["lr"], weight_decay=c["weight_decay"])


def training_example(rows, item, seed_value):
    """The (image, caption) of the run's item-th training example: epoch e visits the images in a shuffle that
    depends only on (seed, e), and each visit draws one of the image's captions with its own seeded choice, so a
    resumed run sees what it would have seen and every caption is trained on."""
    epoch, position = divmod(item, len(rows))
    order = list(range(len(rows)))
    random.Random(seed_value + epoch).shuffle(order)
    row = rows[order[position]]
    return row["image"], random.Random(f"{seed_value}:{item}").choice(row["references"])


def training_batch(processor, rows, micro_batch_number, c):
    """The run's micro_batch_number-th batch of batch_size training examples, with labels (make_batch)."""
    first = micro_batch_number * c["batch_size"]
    pairs = [training_example(rows, first + i, c["seed"]) for i in range(c["batch_size"])]
    return make_batch(processor, [image for image, _ in pairs], [text for _, text in pairs],
                      text_instruction=c["instruction"])


def training_loss(model, batch):
    """Mean cross-entropy of the caption tokens (the labels that are not IGNORE_INDEX), computed by the model."""
    return model(**batch).loss


class StopRequested:
    """SIGTERM (what Colab and Kaggle send when a runtime ends) and Ctrl-C set a flag that the loop checks after
    each step: it saves the resume point, then exits. A second Ctrl-C stops at once."""
    def __init__(self):
        self.signal_name = None

    def __enter__(self):
        self.previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            for s in self.previous:
                signal.signal(s, self.handle)
        except ValueError:   # not the main thread: signals stay as they were
            self.previous = {}
        return self

    def handle(self, number, frame):
        if self.signal_name and number == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(number).name
        print(f"{self.signal_name}: saving a resume point after this step, then exiting", flush=True)

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def read_resume_point(last_dir, c):
    """The state saved in last_dir/state.pt, or None where there is none. A resume point trained with other
    settings stops with one line naming them."""
    path = os.path.join(last_dir, "state.pt")
    if not os.path.exists(path):
        return None
    state = load_state(path)
    saved = read_config(last_dir)
    differing = [k for k in RESUME_KEYS if k in saved and saved[k] != c[k]]
    if differing:
        raise SystemExit(f"error: {last_dir} was trained with other settings: " + ", ".join(
            f"{k} = {saved[k]!r} there, {c[k]!r} now" for k in differing) +
            "; use the same values, or another --out_dir")
    return state


def restore_optimizer(state, optimizer, scaler, last_dir):
    """Load a resume point's optimizer and gradient-scaler state; (step, best_bleu) to go on from."""
    try:
        optimizer.load_state_dict(state["optimizer"])
        if "scaler" in state and scaler.is_enabled():
            scaler.load_state_dict(state["scaler"])
        step, best_bleu = int(state["step"]), float(state["best_bleu"])
    except (KeyError, ValueError, TypeError, RuntimeError) as e:
        raise SystemExit(f"error: {os.path.join(last_dir, 'state.pt')} does not fit this run ({one_line(e)}); "
                         f"delete {last_dir} to start again from step 0") from None
    print(f"resuming from {last_dir} at step {step}")
    return step, best_bleu


def nonfinite_loss_message(loss_value, step, precision_name, last_dir):
    kept = f"{last_dir} keeps step {state_step(last_dir)}" if os.path.exists(last_dir) else \
        "no resume point was written"
    return (f"error: the loss is {loss_value} at step {step} (precision {precision_name}); stopped without saving: "
            f"{kept}. Try a lower --lr or --precision=fp32")


def train_model(data_dir, out_dir, c=None):
    """The training run; returns the best validation BLEU. Stops with one line on bad data, unwritable out_dir, a
    damaged resume state, a resumed run whose settings differ from its resume point, or a non-finite loss."""
    c = c or settings()
    torch.manual_seed(c["seed"])
    check_writable_folder(out_dir, "out_dir")
    # the data: every training image, the first val_samples validation images
    train_rows = load_split(os.path.join(data_dir, "train_data.parquet"), need_caption=True)
    val_rows = load_split(os.path.join(data_dir, "valid_data.parquet"), need_caption=True)
    val_rows = val_rows[:c["val_samples"]] if c["val_samples"] else val_rows
    # the resume point of a stopped run, if any (both folders first recovered from a kill while saving)
    last_dir, best_dir = os.path.join(out_dir, "last"), os.path.join(out_dir, "adapter")
    recover(last_dir)
    recover(best_dir)
    state = read_resume_point(last_dir, c)
    # the model: the frozen base with new LoRA, or with the resume point's LoRA
    precision_name, why = choose_precision(c["precision"], default_device_type())
    model, processor, used_backend = load_model(c, last_dir if state is not None else None, trainable=True,
                                                precision_name=precision_name)
    device = next(model.parameters()).device
    lora_parameters = [p for p in model.parameters() if p.requires_grad]
    n_lora, n_all = sum(p.numel() for p in lora_parameters), sum(p.numel() for p in model.parameters())
    print(f"backend {used_backend} on {device}: {n_lora:,} trainable LoRA parameters of {n_all:,} "
          f"({100 * n_lora / n_all:.2f} %)")
    print(f"precision: {precision_name} ({why})")
    # the optimizer over the LoRA matrices only, and the gradient scaler (enabled for fp16 only)
    optimizer = make_optimizer(lora_parameters, c)
    scaler = torch.amp.GradScaler(device.type, enabled=precision_name == "fp16")
    images_per_step = c["batch_size"] * c["grad_accum"]
    total_steps = c["max_steps"] or max(1, math.ceil(c["epochs"] * len(train_rows) / images_per_step))
    step, best_bleu = restore_optimizer(state, optimizer, scaler, last_dir) if state is not None else (0, -1.0)
    if step == 0:   # the zero-shot baseline; a broken pipeline shows here, before hours of training
        best_bleu = validate(model, processor, used_backend, val_rows, c, precision_name, step)
        save_adapter(model, best_dir, c)   # B starts at 0 (Hu et al. 2021, 4.1): this adapter is the base model

    model.train()
    start, start_step, loss_sum, loss_steps = time.time(), step, 0.0, 0
    with StopRequested() as stop:
        while step < total_steps:
            # determine and set the learning rate for this step
            step_lr = learning_rate(step, total_steps, c)
            for group in optimizer.param_groups:
                group["lr"] = step_lr
            # forward backward over grad_accum micro-batches; each loss / grad_accum, so the gradients add to the mean
            for micro in range(c["grad_accum"]):
                batch = training_batch(processor, train_rows, step * c["grad_accum"] + micro, c).to(device)
                with autocast(device.type, precision_name):
                    loss = training_loss(model, batch) / c["grad_accum"]
                loss_value = loss.item()
                if not math.isfinite(loss_value):   # stop before the update: the resume point stays good
                    raise SystemExit(nonfinite_loss_message(loss_value, step + 1, precision_name, last_dir))
                scaler.scale(loss).backward()   # fp16: the loss scaled up so small gradients do not round to 0
                loss_sum += loss_value
            # clip the gradient (unscaled first, so that the clip sees its true norm)
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(lora_parameters, c["grad_clip"])
            # update the LoRA weights (the scaler skips a step whose gradients overflowed) and flush the gradients
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step, loss_steps = step + 1, loss_steps + 1
            # logging: the mean loss since the last log line, the learning rate of this step, the time left
            if step % c["log_every"] == 0 or step == total_steps:
                seconds = (time.time() - start) / (step - start_step)
                print(f"step {step}/{total_steps} loss {loss_sum / loss_steps:.4f} lr {step_lr:.2e} "
                      f"{seconds:.1f} s/step, about {(total_steps - step) * seconds / 60:.1f} min left", flush=True)
                loss_sum, loss_steps = 0.0, 0
            # evaluate: validation BLEU, and keep the adapter that scores best
            if step % c["eval_every"] == 0 or step == total_steps:
                score = validate(model, processor, used_backend, val_rows, c, precision_name, step)
                if score > best_bleu:
                    best_bleu = score
                    save_adapter(model, best_dir, c)
                    print(f"  best so far: adapter saved to {best_dir}")
            # save a resume point: every save_every steps, at the end, and before stopping early
            out_of_time = c["max_minutes"] > 0 and time.time() - start > c["max_minutes"] * 60
            if step % c["save_every"] == 0 or step == total_steps or out_of_time or stop.signal_name:
                save_adapter(model, last_dir, c, {"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                                                  "step": step, "best_bleu": best_bleu, "precision": precision_name})
            # termination conditions: a signal, the time limit (the loop's own condition is the last step)
            if stop.signal_name:
                raise SystemExit(f"stopped by {stop.signal_name} at step {step}/{total_steps}: resume point saved "
                                 f"in {last_dir}; run the same command to go on")
            if out_of_time:
                print(f"stopped after {c['max_minutes']} minutes at step {step}/{total_steps}; run the same command "
                      f"to resume")
                return best_bleu
    print(f"done: best validation BLEU {best_bleu:.2f}, adapter in {best_dir}")
    return best_bleu


# ----------------------------------------------------------------------------- prediction
def check_submission_path(path):
    if os.path.isdir(path):
        raise SystemExit(f"error: --submission {path!r} is a folder; give a file name such as submission.json")
    check_writable_folder(os.path.dirname(os.path.abspath(path)), "the folder of --submission")


def write_submission(data_dir, out_dir, submission, c=None):
    """Write submission: [{"idx": int, "output": str}] for every test image, in idx order, each idx exactly once,
    written whole or not at all. The base model and prompt are those the adapter was trained with
    (out_dir/adapter/caption_config.json), whatever the configuration block says now; the module's globals are not
    changed."""
    c = c or settings()
    check_submission_path(submission)
    rows = load_split(os.path.join(data_dir, "test_data.parquet"), need_caption=False)
    indices = [r["idx"] for r in rows]
    if len(set(indices)) != len(indices):
        duplicate = next(i for i in indices if indices.count(i) > 1)
        raise CaptionDataError(f"test_data.parquet: idx {duplicate} appears more than once")
    adapter_dir = os.path.join(out_dir, "adapter")
    recover(adapter_dir)
    if not os.path.isdir(adapter_dir):
        raise SystemExit(f"error: {adapter_dir} not found: train first (python caption.py --train --out_dir={out_dir})")
    adapter_settings = {k: v for k, v in read_config(adapter_dir).items() if k in MODEL_KEYS}
    differing = {k: v for k, v in adapter_settings.items() if c.get(k) != v}
    if differing:
        print("using the adapter's settings: " + ", ".join(f"{k} = {v!r}" for k, v in differing.items()))
    c = {**c, **adapter_settings}
    precision_name = choose_precision(c["precision"], default_device_type())[0]
    model, processor, _ = load_model(c, adapter_dir, trainable=False, precision_name=precision_name)
    rows.sort(key=lambda r: r["idx"])
    start = time.time()
    captions = generate_captions(model, processor, [r["image"] for r in rows], c, precision_name)
    temporary = submission + ".tmp"
    try:
        with open(temporary, "w") as f:
            json.dump([{"idx": r["idx"], "output": text} for r, text in zip(rows, captions)], f, indent=1)
        os.replace(temporary, submission)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    print(f"wrote {len(rows)} captions to {submission} ({time.time() - start:.0f} s); e.g. {captions[0]!r}")


def main(argv):
    # --model=... is the short name of model_name (a variable called `model` holds the network below)
    arguments = ["--model_name" + a[len("--model"):] if a.startswith("--model=") else a for a in argv]
    positional = parse_overrides(arguments, globals(), CHECKS)
    if positional:
        raise SystemExit(f"error: caption.py takes no positional arguments, got {positional[0]!r} "
                         f"(every option is --name=value; --help lists them)")
    torch.set_num_threads(num_threads)
    c = settings()
    # both outputs are checked before any work: --train --predict must not find a bad --submission after training
    if train:
        check_writable_folder(out_dir, "out_dir")
    if predict:
        check_submission_path(submission)
    try:
        if train:
            train_model(data_dir, out_dir, c)
            gc.collect()   # let the trained model go before --predict loads the adapter (two 11B do not fit a T4)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        if predict:
            write_submission(data_dir, out_dir, submission, c)
        if not (train or predict):
            print(__doc__.strip())
            print("\nchoose --train or --predict (--help lists every option)")
    except CaptionDataError as e:
        raise SystemExit(f"error: {e}") from None
    except OSError as e:   # a full disk or a folder gone while writing: one line naming the file
        raise SystemExit(f"error: {e.filename + ': ' if e.filename else ''}{e.strerror or e}") from None


# =============================================================================
# Not part of the lesson: the tiny model for --tiny and the tests. A random Mllama small enough for a CPU, built
# in code (no download), that runs the same classes and code paths as the 11B model.
# =============================================================================
# A Jinja chat template with Llama 3.2 Vision's format for an image and one user turn (the real processor
# brings its own): no system message when an image is present, the image token before the instruction.
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}<|image|>"
    "{% else %}{{ content['text'] }}{% endif %}{% endfor %}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
TINY_SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                       EOT, "<|finetune_right_pad_id|>", "<|image|>"]


def build_tiny_model(model_seed=None):
    """A randomly initialised Mllama (220k parameters) with a byte-level tokenizer and a 32x32 one-tile image
    processor: the same classes and code paths as the 11B model, at a size a CPU runs in seconds. model_seed
    (default: seed) fixes its weights, so that a saved adapter fits the base it is loaded on."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import MllamaConfig, MllamaForConditionalGeneration, MllamaProcessor, PreTrainedTokenizerFast
    from transformers.models.mllama.configuration_mllama import MllamaTextConfig, MllamaVisionConfig
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    bytes_vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}  # 256 tokens
    byte_tokenizer = Tokenizer(models.BPE(vocab=bytes_vocab, merges=[]))
    byte_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    byte_tokenizer.decoder = decoders.ByteLevel()
    byte_tokenizer.add_special_tokens(TINY_SPECIAL_TOKENS)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=byte_tokenizer, bos_token="<|begin_of_text|>",
                                        eos_token=EOT, pad_token="<|finetune_right_pad_id|>")
    image_processor = MllamaImageProcessorPil(size={"height": 32, "width": 32}, max_image_tiles=1)
    processor = MllamaProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=TINY_CHAT_TEMPLATE)

    token_id = tokenizer.convert_tokens_to_ids
    vision = MllamaVisionConfig(hidden_size=32, num_hidden_layers=2, num_global_layers=1, attention_heads=2,
                                intermediate_size=64, vision_output_dim=64, image_size=32, patch_size=8,
                                max_num_tiles=1, intermediate_layers_indices=[0], supported_aspect_ratios=[[1, 1]])
    # language widths are multiples of 64: bitsandbytes' CPU kernels for 4-bit inference need whole 64-blocks
    text = MllamaTextConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=4, num_attention_heads=2,
                            num_key_value_heads=1, intermediate_size=128, cross_attention_layers=[1, 3],
                            max_position_embeddings=1024, bos_token_id=token_id("<|begin_of_text|>"),
                            eos_token_id=token_id(EOT), pad_token_id=token_id("<|finetune_right_pad_id|>"))
    config = MllamaConfig(vision_config=vision, text_config=text, image_token_index=token_id("<|image|>"))
    torch.manual_seed(seed if model_seed is None else model_seed)
    model = MllamaForConditionalGeneration(config)
    # The language model sees the image only through its cross-attention layers, and each one's output is
    # scaled by tanh(gate) with the gates initialised to 0: a fresh random Mllama ignores the image entirely
    # (the pretrained 11B has learned gates). Open them, and check they are there, or a test of "the image
    # matters" would pass on a text-only model.
    gates = [p for n, p in model.named_parameters() if n.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate"))]
    if len(gates) != 2 * len(text.cross_attention_layers):
        raise RuntimeError(f"tiny Mllama: expected {len(text.cross_attention_layers)} cross-attention layers "
                           f"with 2 gates each, found {len(gates)} gates")
    with torch.no_grad():
        for gate in gates:
            gate.fill_(1.0)
        # The frozen output layer at the default std 0.02 bounds every logit by |row| * |h| = 0.02 * hidden_size
        # = 1.3 after the final RMSNorm (|h| = sqrt(64)), so no adapter could bring the loss below about 3
        # (log(vocab) is 5.6); give it a usable scale.
        model.lm_head.weight.normal_(std=0.3)
    model.generation_config.pad_token_id = text.pad_token_id
    return model, processor


if __name__ == "__main__":
    main(sys.argv[1:])

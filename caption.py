"""
Image captioning by LoRA fine-tuning of Llama 3.2 Vision 11B (homework part 2-3), scored by BLEU (bleu.py).
unsloth's FastVisionModel on a CUDA GPU that runs it; transformers' MllamaForConditionalGeneration with peft LoRA
on the same projections elsewhere. Both load the base in 4-bit NF4 (QLoRA) and train the LoRA matrices only, under
autocast, in a plain loop. CUDA or the CPU: a Mac's mps is not used (bitsandbytes' 4-bit needs CUDA or the CPU).

    python caption.py --train --data_dir=data/caption --out_dir=out/caption --max_steps=250
    python caption.py --predict --data_dir=data/caption --out_dir=out/caption --submission=submission.json
    python caption.py --train --tiny --max_steps=20     # a tiny random Mllama built in code: runs on a CPU in seconds

Training validates at step 0 (the zero-shot BLEU) and every eval_every steps, and saves numbered folders
out_dir/step_<N>/ (adapter, optimizer and scaler state) every save_every steps and at each new best validation
BLEU; out_dir/checkpoint.json names the last and the best, with the settings. Run the same command again to
resume; --predict uses the best adapter (same model and prompt settings). Ctrl-C or SIGTERM saves, then exits.
"""
import functools
import gc
import hashlib
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

from bleu import bleu_from_stats, corpus_stats, parse_overrides

# -----------------------------------------------------------------------------
# configuration: every constant below can be overridden as --name=value
train = False           # fine-tune on data_dir/train_data.parquet, validate on valid_data.parquet
predict = False         # caption data_dir/test_data.parquet into submission
tiny = False            # a tiny randomly initialised Mllama and processor built in code (no download)
data_dir = "data/caption"  # holds train_data.parquet, valid_data.parquet, test_data.parquet
out_dir = "out/caption"    # out_dir/step_<N>/: the saved steps; out_dir/checkpoint.json: which is last and best
submission = "submission.json"  # --predict writes [{"idx": ..., "output": caption}] here
model_name = "unsloth/Llama-3.2-11B-Vision-Instruct"  # a Hub id or a local folder
backend = "auto"        # auto | unsloth | transformers (auto: unsloth on CUDA capability >= 7.0 where it imports)
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
eval_every = 50         # steps between validation BLEU checks (also at step 0 and at the end)
save_every = 20         # steps between saved steps in out_dir (a T4 step takes about 30 s)
val_samples = 0         # validation images captioned for BLEU (0 = all)
max_new_tokens = 48     # caption length limit when generating
predict_batch_size = 8  # images per generate() call, in --predict and in validation
log_every = 10          # steps between loss lines
max_minutes = 0.0       # stop cleanly (the step saved) after this long; 0 = no limit
seed = 3407             # new LoRA weights, the --tiny model's weights, the order of images and captions
num_threads = 2         # CPU threads for torch (torch.set_num_threads)
# -----------------------------------------------------------------------------

CHECKS = {"backend": ("auto", "unsloth", "transformers"), "precision": ("auto", "bf16", "fp16", "fp32"),
          "lora_dropout": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
          **{name: (lambda v: v > 0, "a number > 0") for name in ("lr", "grad_clip")},
          **{name: (lambda v: v >= 1, "an integer >= 1") for name in (
              "lora_r", "lora_alpha", "epochs", "batch_size", "grad_accum", "eval_every", "save_every",
              "max_new_tokens", "predict_batch_size", "log_every", "num_threads")},
          **{name: (lambda v: v >= 0, "a number >= 0") for name in (
              "max_steps", "warmup_steps", "weight_decay", "val_samples", "max_minutes")}}
# Settings saved with the steps: a resumed run must match all of RESUME_KEYS (batch_size and grad_accum fix the
# examples of each step), --predict those of MODEL_KEYS (the adapter fits one base and was trained on one prompt).
MODEL_KEYS = ("model_name", "tiny", "instruction", "lora_r", "lora_alpha", "lora_dropout", "finetune_vision", "seed")
RESUME_KEYS = MODEL_KEYS + ("batch_size", "grad_accum")
POINTER = "checkpoint.json"   # {"last": "step_<N>", "best": "step_<M>", the RESUME_KEYS}, replaced whole (atomic)
EOT = "<|eot_id|>"      # Llama 3's end of turn: the assistant's caption ends with it, generation stops on it
IGNORE_INDEX = -100     # cross_entropy skips these label positions
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ----------------------------------------------------------------------------- system: device and precision
def choose_precision(requested, device_type):
    """The autocast precision for `requested` (--precision) on this device: auto is bf16 where the hardware computes
    it natively (CUDA capability >= 8.0, i.e. Ampere and later; CPUs with AMX or AVX512-BF16, among the flags of
    Linux's /proc/cpuinfo), fp16 with a gradient scaler on older GPUs (a T4, 7.5, only emulates bf16: slow, and a
    P100, 6.0, fails in cuBLAS), and fp32 elsewhere."""
    if device_type == "cuda":
        major, minor = torch.cuda.get_device_capability()
        check_cuda_build(major, minor)
        if requested == "bf16" and major < 8:
            raise ValueError(f"--precision=bf16 needs CUDA capability 8.0, this GPU has {major}.{minor}: "
                             f"use --precision=fp16 (or auto)")
    if requested != "auto":
        return requested
    if device_type == "cuda":
        return "bf16" if major >= 8 else "fp16"
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""   # no such file: not Linux
    return "bf16" if "amx_bf16" in flags or "avx512_bf16" in flags else "fp32"


# ----------------------------------------------------------------------------- data
def load_split(path, need_caption):
    """Rows of a homework parquet as dicts of its columns, `image` decoded to PIL RGB (a struct {bytes, path} or
    plain binary). Training files carry `caption` and/or `references` (a list of captions); rows with the same image
    bytes (a file with one row per caption) become one row whose `references` holds all their captions, the
    `caption` first. Test files carry an integer `idx`. Anything missing or unreadable is a ValueError (file, row,
    field)."""
    name = os.path.basename(path)
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several kinds for a file that is missing or not parquet
        raise ValueError(f"{name}: cannot read parquet ({type(e).__name__}: {e})") from None
    rows = {}   # training: one row per image (its bytes as the key); test: one per idx
    for number, row in enumerate(table.to_pylist()):
        where = f"{name}: row {number}"
        data = row["image"].get("bytes") if isinstance(row.get("image"), dict) else row.get("image")
        if need_caption and not isinstance(row.get("references") or [], list):
            raise ValueError(f"{where}: field 'references' must be a list of captions, got {row['references']!r}")
        captions = [row["caption"]] if "caption" in row else []
        captions += row.get("references") or []
        if not data:
            raise ValueError(f"{where}: field 'image' is missing or has no bytes")
        if not need_caption and not isinstance(row.get("idx"), int):
            raise ValueError(f"{where}: field 'idx' must be an integer, got {row.get('idx')!r}")
        if need_caption and not (captions and all(isinstance(text, str) and text.strip() for text in captions)):
            raise ValueError(f"{where}: field 'caption' or 'references' is empty or not text")
        key = data if need_caption else row["idx"]
        if not need_caption and key in rows:
            raise ValueError(f"{where}: idx {key} appears more than once")
        if key not in rows:
            try:
                rows[key] = dict(row, image=Image.open(io.BytesIO(data)).convert("RGB"), references=[])
            except Exception as e:
                raise ValueError(f"{where}: cannot decode image ({type(e).__name__}: {e})") from None
        rows[key]["references"] = list(dict.fromkeys(rows[key]["references"] + captions))   # each caption once
    if not rows:
        raise ValueError(f"{name}: no rows")
    return list(rows.values())


# ----------------------------------------------------------------------------- the model
# peft target modules: every attention (self and cross) and MLP projection of the language model, and
# (finetune_vision) of the vision encoder; the same set unsloth's get_peft_model picks for vision models.
LANGUAGE_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
VISION_TARGETS = r".*vision_model.*\.(q_proj|k_proj|v_proj|o_proj|fc1|fc2)"
# Kept out of 4-bit: NF4 of everything degrades this model (unsloth measured error spikes), and these three are
# small next to the 8.7 B language-layer weights (0.9 B, 0.03 B, 0.5 B parameters). transformers 5 matches a name
# from the module path's start or as a suffix ("model.vision_model"), 4.x as a substring ("vision_model").
SKIP_4BIT = ["vision_model", "model.vision_model", "multi_modal_projector", "lm_head"]


def choose_backend(use_cuda):
    """unsloth where asked (--backend), or under auto on a CUDA GPU where it can run: capability >= 7.0 (its Triton
    kernels; Kaggle's P100 is 6.0). Otherwise transformers + peft. Where unsloth then fails to import or to load,
    load_model says why in one line and goes on with transformers (under auto) or stops (asked for by name)."""
    old_gpu = use_cuda and torch.cuda.get_device_capability()[0] < 7   # unsloth's Triton kernels need 7.0
    if backend == "transformers" or (backend == "auto" and (not use_cuda or tiny or old_gpu)):
        return "transformers"
    return "unsloth"


def load_base(precision_name, use_cuda):
    """The frozen base and its processor. 16-bit weights are stored in the autocast dtype (fp16 on a T4), fp32 when
    precision is fp32. With load_in_4bit, the language layers are QLoRA's (Dettmers et al. 2023, "QLoRA: Efficient
    Finetuning of Quantized LLMs") 4-bit NormalFloat (NF4) with double quantization (the per-block scales quantized
    too), computing in the autocast dtype; bitsandbytes quantizes while loading."""
    from transformers import AutoProcessor, BitsAndBytesConfig, MllamaForConditionalGeneration
    dtype = DTYPES[precision_name]
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype,
        llm_int8_skip_modules=SKIP_4BIT) if load_in_4bit else None
    with tempfile.TemporaryDirectory() as folder:
        if tiny:   # the tiny model (at the end of the file) is saved and loaded back as the 11B is loaded
            tiny_model, processor = build_tiny_model()
            tiny_model.save_pretrained(folder)
        base = MllamaForConditionalGeneration.from_pretrained(folder if tiny else model_name, dtype=dtype,
                                                              quantization_config=quantization,
                                                              device_map={"": 0} if use_cuda else None)
    processor = processor if tiny else AutoProcessor.from_pretrained(model_name)
    if tiny:   # built in code: no folder or Hub id where peft should look for the base's vocabulary
        base.name_or_path = ""
    if processor.tokenizer.pad_token is None:   # Llama 3's reserved padding token, as unsloth uses it
        processor.tokenizer.pad_token = "<|finetune_right_pad_id|>"
    return base, processor


def checkpointed_forward(module, *args, **kwargs):
    """The forward that load_transformers gives a vision layer: its own, checkpointed while training (Chen et al.
    2016, "Training Deep Nets with Sublinear Memory Cost": activations recomputed in backward)."""
    if module.training and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(module._unchecked_forward, *args, use_reentrant=False, **kwargs)
    return module._unchecked_forward(*args, **kwargs)


def load_transformers(adapter_dir, trainable, precision_name, use_cuda):
    """The base through transformers with new LoRA on LANGUAGE_TARGETS (and VISION_TARGETS) or the saved adapter in
    adapter_dir. Where trainable, the frozen base is prepared for training: a 4-bit one by peft (norms in fp32; the
    big frozen 16-bit matrices, which peft upcasts to fp32, +3.9 GB on the 11B, stored back in the autocast dtype),
    with non-reentrant gradient checkpointing of the language layers (transformers) and of every
    MllamaVisionEncoderLayer (here: transformers does not, and one 11B vision layer with LoRA keeps about 300 MiB of
    activations per image)."""
    import peft
    base, processor = load_base(precision_name, use_cuda)
    if trainable and load_in_4bit:
        peft.prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)   # checkpointing is below
        for module in base.modules():
            if type(module) in (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv2d):
                module.to(DTYPES[precision_name])
    if trainable and gradient_checkpointing:
        # non-reentrant: reentrant checkpointing crashes on the cross-attention states in backward. (transformers
        # 5.23 renamed gradient_checkpointing_enable, which warns from then on and goes in transformers 6.)
        enable = getattr(base, "activation_checkpointing_enable", None) or base.gradient_checkpointing_enable
        enable({"use_reentrant": False})
        for module in base.modules():
            if type(module).__name__ == "MllamaVisionEncoderLayer":
                module._unchecked_forward = module.forward
                module.forward = functools.partial(checkpointed_forward, module)
    if adapter_dir:
        try:
            model = peft.PeftModel.from_pretrained(base, adapter_dir, is_trainable=trainable)
        except Exception as e:
            raise ValueError(f"cannot load the adapter in {adapter_dir} ({type(e).__name__}: {e})") from None
    else:
        targets = f"({LANGUAGE_TARGETS}|{VISION_TARGETS})" if finetune_vision else LANGUAGE_TARGETS
        model = peft.get_peft_model(base, peft.LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                                                          target_modules=targets, bias="none"))
    # Drop the hooks that make embedding outputs require grad (transformers and peft add them for reentrant
    # checkpointing, transformers 5 on the vision patch embedding too): with non-reentrant checkpointing they only
    # make backward run through the frozen vision tower, and storing its graph costs gigabytes.
    for module in model.modules() if trainable else []:
        for key, hook in list(module._forward_hooks.items()):
            if getattr(hook, "__name__", "") in ("make_inputs_require_grads", "make_inputs_require_grad"):
                del module._forward_hooks[key]
    return model, processor


def load_unsloth(adapter_dir, trainable, precision_name):
    """The same model through unsloth (GPU only): the base in 4-bit where load_in_4bit, its LoRA on the same
    projections, its gradient checkpointing (vision layers included; always on). An adapter folder loads through
    from_pretrained, as in unsloth's notebooks."""
    from unsloth import FastVisionModel   # it patches transformers on import: imported before any model loads
    model, processor = FastVisionModel.from_pretrained(adapter_dir or model_name, load_in_4bit=load_in_4bit,
                                                       dtype=DTYPES[precision_name],
                                                       use_gradient_checkpointing="unsloth")
    if adapter_dir is None:
        # its defaults: LoRA on every attention and MLP projection of the language layers, no bias
        model = FastVisionModel.get_peft_model(model, finetune_vision_layers=finetune_vision, r=lora_r,
                                               lora_alpha=lora_alpha, lora_dropout=lora_dropout, random_state=seed)
    return model, processor


def set_mode(model, used_backend, training):
    """Training mode (dropout, gradient checkpointing) or evaluation mode; unsloth also patches its model for
    training or for fast generation."""
    if used_backend == "unsloth":
        from unsloth import FastVisionModel
        (FastVisionModel.for_training if training else FastVisionModel.for_inference)(model)
    model.train(training)


def load_model(adapter_dir=None, trainable=True):
    """(model with LoRA, processor, backend used, precision): the base model_name (or the tiny model) with new LoRA,
    or with the saved adapter in adapter_dir; trainable: prepared for training, the LoRA matrices in fp32 (the
    gradient scaler refuses fp16 gradients). Prints the start line: backend, device, precision."""
    use_cuda = torch.cuda.is_available()
    precision_name = choose_precision(precision, "cuda" if use_cuda else "cpu")
    used_backend = choose_backend(use_cuda)
    if used_backend == "unsloth":
        try:   # unsloth's import or loading failing (not installed, Triton, a download): transformers under auto
            model, processor = load_unsloth(adapter_dir, trainable, precision_name)
        except Exception as e:
            reason = f"unsloth failed to load {adapter_dir or model_name} ({type(e).__name__}: {e}".splitlines()[0]
            if backend == "unsloth":
                raise ValueError(f"--backend=unsloth but {reason})") from None
            print(f"note: {reason}); using transformers + peft")
            used_backend = "transformers"
    if used_backend == "transformers":
        model, processor = load_transformers(adapter_dir, trainable, precision_name, use_cuda)
    for p in model.parameters() if trainable else []:
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    set_mode(model, used_backend, training=trainable)   # from_pretrained gives evaluation mode: no checkpointing
    print(f"backend {used_backend} on {model.device}, precision {precision_name} (--precision={precision}), "
          f"{sum(p.numel() for p in model.parameters() if p.requires_grad):,} trainable LoRA parameters")
    return model, processor, used_backend, precision_name


# ----------------------------------------------------------------------------- prompts and batches
def make_batch(processor, images, captions=None):
    """Processor outputs for images with the prompt; with captions, the caption and <|eot_id|> follow the prompt
    and `labels` keeps only those tokens: prompt, image token and padding are IGNORE_INDEX (-100)."""
    # the user turn (image + instruction) and the assistant's header, in the model's own chat template
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    texts = [prompt] * len(images) if captions is None else [prompt + caption.strip() + EOT for caption in captions]
    # training pads on the right; generation pads on the left so every prompt ends where generation begins
    processor.tokenizer.padding_side = "right" if captions is not None else "left"
    batch = processor(text=texts, images=[[image] for image in images], padding=True, return_tensors="pt",
                      add_special_tokens=False)  # the chat template already starts with <|begin_of_text|>
    if captions is not None:
        # the prompt ends in a special token and a line break, so it tokenizes alike alone and before a caption
        prompt_length = len(processor.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)   # padding
        batch["labels"][:, :prompt_length] = IGNORE_INDEX   # the prompt
    return batch


# ----------------------------------------------------------------------------- captions and validation BLEU
# What stands before the caption on its line: list markers ("1. ", "a) ", "- ", "• "), markdown ("#", ">"), and a
# label or preamble ending in a colon ("Caption:", "Here is a caption:", "Answer:"), one after another.
LABEL = re.compile(r"^(\d+[.)]\s+|[a-z]\)\s+|[-*•#>]+\s*|[^:]*:(\s+|$))+", re.IGNORECASE)
PREAMBLE = re.compile(r"(sure|certainly|of course|okay)\W*$", re.IGNORECASE)   # a line that is only a reply
WORD = re.compile(r"[^\W\d_]")   # a letter, of any script: what a caption must hold to score anything
# A sentence ends at '.', '!' or '?' (and closing quotes) before the end or a word that is not lower-case, but not
# after a single letter or a short title: "J. Edgar", "U.S. Capitol", "Mr. Smith", "St. Louis".
SENTENCE_END = re.compile(r"(?<!\b[A-Za-z])(?<!\b(?:Mr|Ms|Dr|St|Mt|Jr|vs))(?<!\bMrs)[.!?][\"'”’)]*(?= [^a-z]|$)")


def clean_caption(text):
    """A generated caption as one clean sentence: the first line with a letter once labels and list markers are
    gone and that is no mere reply ("Sure!"), without markdown emphasis or enclosing quotes, cut after its first
    sentence, single spaces, and ' .' at the end where it has no end punctuation. A text with a letter gives a
    caption with a letter. Why ' .' with a space: the homework's Flickr8k captions were tokenized before release,
    with a space before the final period ('... in a big city .'; 90 % of the training captions end so, the rest
    have none), and a model fine-tuned on them learns to end that way. Under sacrebleu's 13a tokenization (bleu.py's
    default, the validation BLEU here) 'city.' and 'city .' are the same tokens; under whitespace tokens (bleu.py
    --mode=nltk, as course scoring scripts often do) only the references' form ' .' matches."""
    text = re.sub(r"(\*\*|__|\*|_)(.+?)\1", r"\2", text)   # markdown bold and italics
    lines = [line.strip() for line in text.splitlines() if line.strip()] or [""]
    captions = [LABEL.sub("", line) for line in lines]
    text = next((line for line in captions if WORD.search(line) and not PREAMBLE.match(line)), None)
    text = text or next((line for line in lines if WORD.search(line)), lines[0])   # no line passes: the first
    text = re.sub(r"\s+", " ", text)
    letter = WORD.search(text)   # no sentence ends before the first letter: ". A dog runs." stays whole
    end = SENTENCE_END.search(text, letter.start() if letter else 0)
    text = (text[:end.end()] if end else text).strip(" \"'“”‘’")   # and enclosing quotes go
    if text and text[-1] not in ".!?":
        text += " ."
    return text


@torch.no_grad()
def generate_captions(model, processor, images, ctx):
    """Greedy captions, cleaned (clean_caption), for a list of PIL images, in order, predict_batch_size at a time."""
    captions = []
    for s in range(0, len(images), predict_batch_size):
        if stop_signal:   # Ctrl-C or SIGTERM in training's validation: stop captioning (minutes on a T4), then save
            break
        inputs = make_batch(processor, images[s:s + predict_batch_size]).to(model.device)
        with ctx:
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                    eos_token_id=processor.tokenizer.convert_tokens_to_ids(EOT))
        new_tokens = output[:, inputs["input_ids"].shape[1]:]
        captions += [clean_caption(t) for t in processor.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    return captions


def validate(model, processor, used_backend, rows, ctx, step):
    """Corpus BLEU (bleu.py, sacrebleu's defaults) of greedy captions of rows against all references of each image,
    printed with one caption; leaves the model in training mode."""
    set_mode(model, used_backend, training=False)
    hypotheses = generate_captions(model, processor, [r["image"] for r in rows], ctx)
    set_mode(model, used_backend, training=True)
    if stop_signal:   # cut short by a signal: no score
        return -1.0
    score = bleu_from_stats(corpus_stats(hypotheses, [r["references"] for r in rows])).score   # all of each image's
    print(f"step {step}: validation BLEU {score:.2f} on {len(rows)} images; e.g. {hypotheses[0]!r}")
    return score


# ----------------------------------------------------------------------------- training
def learning_rate(step, total_steps):
    """The learning rate of step (0-based): linear warmup from lr / warmup_steps to lr over the first warmup_steps
    steps, then linear decay that reaches zero just after the last step: the unsloth notebook's "linear" schedule
    (transformers' get_linear_schedule_with_warmup), except that there the first step's rate is 0."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    return lr * max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def training_batch(processor, rows, number):
    """The run's number-th batch of batch_size training examples, with labels (make_batch). Epoch e visits the
    images in a shuffle that depends only on (seed, e), and each visit draws one of the image's captions with its
    own seeded choice, so a resumed run sees what it would have seen and every caption is trained on. The batch's
    dropout masks (lora_dropout) come from (seed, number) too."""
    torch.manual_seed(seed * 1000003 + number)
    images, captions = [], []
    for item in range(number * batch_size, (number + 1) * batch_size):
        epoch, position = divmod(item, len(rows))
        order = list(range(len(rows)))
        random.Random(seed + epoch).shuffle(order)
        images.append(rows[order[position]]["image"])
        captions.append(random.Random(f"{seed}:{item}").choice(rows[order[position]]["references"]))
    return make_batch(processor, images, captions)


def resume(state, optimizer, scaler, precision_name, folder):
    """Load a saved step's optimizer and gradient-scaler state; (step, best_bleu, best folder) to go on from. A run
    saved under another precision goes on under this one; the scaler starts fresh where the saved run had none."""
    optimizer.load_state_dict(state["optimizer"])
    optimizer.param_groups[0]["weight_decay"] = weight_decay   # a changed --weight_decay applies
    if scaler.is_enabled() and state["scaler"]:
        scaler.load_state_dict(state["scaler"])
    print(f"resuming from {folder} at step {state['step']} (saved under {state['precision']}, now {precision_name})")
    return state["step"], state["best_bleu"], state["best"]


def train_model(data_dir, out_dir):
    """The training run of LoRA (Hu et al. 2021) on the frozen base; returns the best validation BLEU."""
    torch.manual_seed(seed)
    train_rows = load_split(os.path.join(data_dir, "train_data.parquet"), need_caption=True)
    val_rows = load_split(os.path.join(data_dir, "valid_data.parquet"), need_caption=True)[:val_samples or None]
    data = hashlib.sha1(json.dumps([r["references"] for r in train_rows]).encode()).hexdigest()[:16]   # the captions
    last, state = load_checkpoint(out_dir, "last", data)
    model, processor, used_backend, precision_name = load_model(last, trainable=True)
    ctx = torch.autocast(model.device.type, dtype=DTYPES[precision_name], enabled=precision_name != "fp32")
    lora = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(lora, lr=lr, weight_decay=weight_decay)   # Loshchilov & Hutter 2019
    scaler = torch.amp.GradScaler(model.device.type, enabled=precision_name == "fp16")   # enabled for fp16 only
    total_steps = max_steps or max(1, math.ceil(epochs * len(train_rows) / (batch_size * grad_accum)))
    step, best_bleu, best = resume(state, optimizer, scaler, precision_name, last) if state else (0, -1.0, None)
    if state is None:   # the zero-shot baseline; a broken pipeline shows here, before hours of training
        best_bleu = validate(model, processor, used_backend, val_rows, ctx, step)
        best = save_checkpoint(model, out_dir, optimizer, scaler, step, best_bleu, None, precision_name, data)
    start, start_step, loss_sum, loss_steps = time.time(), step, 0.0, 0
    while step < total_steps and not stop_signal:   # a signal: the step reached is saved, then the run stops below
        step_lr = learning_rate(step, total_steps)
        optimizer.param_groups[0]["lr"] = step_lr   # one group: the LoRA matrices
        # forward backward over grad_accum micro-batches; each loss / grad_accum, so the gradients add to the mean
        for micro in range(grad_accum):
            batch = training_batch(processor, train_rows, step * grad_accum + micro).to(model.device)
            with ctx:
                loss = model(**batch).loss / grad_accum
            scaler.scale(loss).backward()   # fp16: the loss scaled up so small gradients do not round to 0
            loss_sum += loss.item()
        # clip the gradient (unscaled first, so that the clip sees its true norm), update, flush the gradients
        scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(lora, grad_clip)
        # inf or NaN in the loss or the gradient: stop before the update (fp16: the scaler skips overflowed steps)
        if not math.isfinite(loss_sum) or not (scaler.is_enabled() or math.isfinite(norm)):
            sys.exit(f"error: inf or NaN in the loss or gradient at step {step + 1} ({precision_name}); not saved")
        scaler.step(optimizer)   # skips a step whose gradients overflowed (fp16)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step, loss_steps = step + 1, loss_steps + 1
        # logging: the mean loss since the last log line, the learning rate of this step, the time left
        if step % log_every == 0 or step == total_steps:
            seconds = (time.time() - start) / (step - start_step)
            print(f"step {step}/{total_steps} loss {loss_sum / loss_steps:.4f} lr {step_lr:.2e} "
                  f"{seconds:.1f} s/step, about {(total_steps - step) * seconds / 60:.1f} min left", flush=True)
            loss_sum, loss_steps = 0.0, 0
        # evaluate, and save: a new best, every save_every steps, the last step, and before stopping early
        evaluate = step % eval_every == 0 or step == total_steps
        score = validate(model, processor, used_backend, val_rows, ctx, step) if evaluate else -1.0
        out_of_time = max_minutes > 0 and time.time() - start > max_minutes * 60
        if score > best_bleu:
            best_bleu, best = score, None   # save_checkpoint makes this step the best
        if best is None or step % save_every == 0 or step == total_steps or out_of_time or stop_signal:
            best = save_checkpoint(model, out_dir, optimizer, scaler, step, best_bleu, best, precision_name, data)
        if out_of_time:   # the time limit (the loop's own conditions are the last step and a signal)
            print(f"stopped after {max_minutes} minutes at step {step}/{total_steps}; run the same command to go on")
            return best_bleu
    if stop_signal:
        sys.exit(f"stopped by {stop_signal[0]} at step {step}/{total_steps}: saved; run the same command to go on")
    print(f"done: best validation BLEU {best_bleu:.2f}, adapter in {os.path.join(out_dir, best)}")
    return best_bleu


# ----------------------------------------------------------------------------- prediction
def write_submission(rows, out_dir, submission):
    """Write submission: [{"idx": int, "output": str}] for every test row (load_split's dicts), in idx order, each
    idx exactly once, written whole or not at all, with the best adapter (which needs the model and prompt it was
    trained with)."""
    rows = sorted(rows, key=lambda r: r["idx"])
    best, _ = load_checkpoint(out_dir, "best")
    if best is None:
        raise ValueError(f"{out_dir}: no trained adapter: train first (python caption.py --train --out_dir={out_dir})")
    model, processor, _, precision_name = load_model(best, trainable=False)
    ctx = torch.autocast(model.device.type, dtype=DTYPES[precision_name], enabled=precision_name != "fp32")
    captions = generate_captions(model, processor, [r["image"] for r in rows], ctx)
    save_atomic(json.dumps([{"idx": r["idx"], "output": text} for r, text in zip(rows, captions)], indent=1),
                submission)
    print(f"wrote {len(rows)} captions to {submission}; e.g. {captions[0]!r}")


def main(argv):
    positional = parse_overrides(argv, globals(), CHECKS)
    if positional or not (train or predict):
        sys.exit(f"error: caption.py takes --train and/or --predict and no positional arguments, got {positional} "
                 f"(--help lists the options)")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:   # no DDP here: every rank would write the same files
        sys.exit("error: caption.py trains on one GPU; start it with python, not torchrun")
    torch.set_num_threads(num_threads)
    try:   # both outputs are checked before any work: --train --predict must not find a bad --submission at the end
        if train:
            check_writable(out_dir, "out_dir")
        if predict and (os.path.isdir(submission) or not os.path.basename(submission)):
            raise OSError(f"--submission {submission!r} is a folder; give a file name such as submission.json")
        if predict:
            check_writable(os.path.dirname(os.path.abspath(submission)), "the folder of --submission")
            test_rows = load_split(os.path.join(data_dir, "test_data.parquet"), need_caption=False)
        if train:   # Ctrl-C and SIGTERM (what Colab and Kaggle send when a session ends): save, then exit
            previous = [signal.signal(s, request_stop) for s in (signal.SIGTERM, signal.SIGINT)]
            train_model(data_dir, out_dir)
            for s, handler in zip((signal.SIGTERM, signal.SIGINT), previous):   # predicting stops at once
                signal.signal(s, handler)
            if stop_signal:   # one came as training returned: all is saved, and it would cut the captions short
                sys.exit(f"stopped by {stop_signal[0]} after training; run the same command to go on")
            gc.collect()   # let the trained model go before --predict loads the adapter (two 11B do not fit a T4)
        if predict:
            write_submission(test_rows, out_dir, submission)
    except (ValueError, OSError) as e:   # bad input or an unwritable output: one line naming the file
        message = f"{e.filename}: {e.strerror}" if isinstance(e, OSError) and e.filename else str(e)
        sys.exit(f"error: {message.splitlines()[0]}")
    except KeyboardInterrupt:   # Ctrl-C while predicting, or a second one in training: one line
        sys.exit("\nstopped by Ctrl-C")


# --- robustness (read last) ---
stop_signal = []   # request_stop appends the signal's name; the training loop saves after the step, then exits


def request_stop(number, frame):
    stop_signal.append(signal.Signals(number).name)
    signal.signal(signal.SIGINT, signal.default_int_handler)   # a second Ctrl-C stops at once
    print(f"{stop_signal[0]}: saving after this step, then exiting", flush=True)


def check_writable(folder, what):
    """Stop with one line, before any expensive work, where `folder` cannot be created or written."""
    try:
        os.makedirs(folder, exist_ok=True)
        tempfile.NamedTemporaryFile(dir=folder, prefix=".write_test").close()
    except OSError as e:
        raise OSError(f"{what} {folder!r} is not writable ({e.strerror or e})") from None


def save_atomic(text, path):
    """Write text to path whole or not at all: into path.tmp, then renamed over path (a rename is atomic)."""
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def save_checkpoint(model, out_dir, optimizer, scaler, step, best_bleu, best, precision_name, data=None):
    """Save step `step` as out_dir/step_<step>/ (adapter, resume state), then point out_dir/checkpoint.json at it as
    the last (and as the best where best is None), with the settings, then delete the step folders it no longer
    names. A kill at any moment leaves the pointer naming complete folders. Returns the best folder's name."""
    folder = f"step_{step}"
    model.save_pretrained(os.path.join(out_dir, folder))
    torch.save({"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "step": step,
                "best_bleu": best_bleu, "best": best or folder, "precision": precision_name},
               os.path.join(out_dir, folder, "state.pt"))
    pointer = {"last": folder, "best": best or folder, "data": data, **{key: globals()[key] for key in RESUME_KEYS}}
    save_atomic(json.dumps(pointer, indent=1), os.path.join(out_dir, POINTER))
    for name in os.listdir(out_dir):
        if re.fullmatch(r"step_\d+", name) and name not in (folder, best):   # (not a user's step_2_backup)
            shutil.rmtree(os.path.join(out_dir, name), ignore_errors=True)
    return best or folder


def load_checkpoint(out_dir, which, data=None):
    """(folder, resume state) of the step folder that out_dir/checkpoint.json names as `which` (last, with its
    state, or best, without), or (None, None) where nothing was saved. The settings must be those the steps were
    saved with: all RESUME_KEYS to resume, the MODEL_KEYS to predict. A damaged file stops with one line naming it;
    state.pt loads with weights_only (a crafted pickle in it never runs)."""
    path = os.path.join(out_dir, POINTER)
    if not os.path.exists(path):
        return None, None
    try:
        with open(path) as f:
            pointer = json.load(f)
        folder = os.path.join(out_dir, pointer[which])
        keys = RESUME_KEYS if which == "last" else MODEL_KEYS
        differing = [f"{k} = {pointer[k]!r} there, {globals()[k]!r} now" for k in keys if pointer[k] != globals()[k]]
        if data and pointer.get("data") not in (None, data):   # (a pointer from before this check has none)
            differing.append(f"training captions {pointer['data']} there, {data} now")
        path = os.path.join(folder, "state.pt")
        state = torch.load(path, map_location="cpu", weights_only=True) if which == "last" else None
        for key in ("optimizer", "scaler", "step", "best_bleu", "best", "precision") if state is not None else ():
            state[key]   # a KeyError here: not a resume state of this caption.py
    except Exception as e:
        raise ValueError(f"{path} is damaged or not caption.py's; use another --out_dir ({type(e).__name__}: {e})") \
            from None
    if differing:
        raise ValueError(f"{folder} was trained with other settings: {', '.join(differing)}; use the same values, "
                         f"or another --out_dir")
    return folder, state


# --- extras (not the lesson) ---
def check_cuda_build(major, minor):
    """Stop at once where this PyTorch build has no kernels for the GPU of capability major.minor (Kaggle's P100,
    sm_60, under a build for sm_70 and newer), rather than with a CUDA error from deep inside. A cubin sm_XY runs on
    capability X.y for y >= Y; PTX compute_XY is compiled for any capability >= X.Y. Capability 8.6 is 86 below."""
    archs = torch.cuda.get_arch_list()   # "sm_75", "sm_90a", "compute_120", ...
    built = [(arch.split("_")[0], int(re.sub(r"\D", "", arch))) for arch in archs]
    if archs and not any((kind == "sm" and number // 10 == major and number % 10 <= minor) or
                         (kind == "compute" and number <= 10 * major + minor) for kind, number in built):
        raise ValueError(f"this PyTorch {torch.__version__} has GPU kernels for {' '.join(archs)}, none for "
                         f"{torch.cuda.get_device_name()} (sm_{major}{minor}): install a PyTorch build that lists "
                         f"sm_{major}{minor}, or choose another GPU")


# A Jinja chat template with Llama 3.2 Vision's format for the one user turn make_batch asks for, an image and the
# instruction (the real processor brings its own): no system message when an image is present, the image token
# before the instruction, then the assistant's header (inside the if: Jinja drops a template's final line break).
TINY_CHAT_TEMPLATE = ("{{ bos_token }}<|start_header_id|>user<|end_header_id|>\n\n<|image|>"
                      "{{ messages[0]['content'][1]['text'] }}<|eot_id|>{% if add_generation_prompt %}"
                      "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


def build_tiny_model():
    """A randomly initialised Mllama (220k parameters) with a byte-level tokenizer and a 32x32 one-tile image
    processor: the same classes and code paths as the 11B model, at a size a CPU runs in seconds. seed fixes its
    weights, so that a saved adapter fits the base it is loaded on."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import MllamaConfig, MllamaForConditionalGeneration, MllamaProcessor, PreTrainedTokenizerFast
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    bytes_vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}  # 256 tokens
    byte_tokenizer = Tokenizer(models.BPE(vocab=bytes_vocab, merges=[]))
    byte_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    byte_tokenizer.decoder = decoders.ByteLevel()
    byte_tokenizer.add_special_tokens(["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                       "<|end_header_id|>", EOT, "<|finetune_right_pad_id|>", "<|image|>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=byte_tokenizer, bos_token="<|begin_of_text|>",
                                        eos_token=EOT, pad_token="<|finetune_right_pad_id|>")
    image_processor = MllamaImageProcessorPil(size={"height": 32, "width": 32}, max_image_tiles=1)
    processor = MllamaProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=TINY_CHAT_TEMPLATE)

    token_id = tokenizer.convert_tokens_to_ids
    vision = dict(hidden_size=32, num_hidden_layers=2, num_global_layers=1, attention_heads=2,
                  intermediate_size=64, vision_output_dim=64, image_size=32, patch_size=8, max_num_tiles=1,
                  intermediate_layers_indices=[0], supported_aspect_ratios=[[1, 1]])
    # language widths are multiples of 64: bitsandbytes' CPU kernels for 4-bit inference need whole 64-blocks
    text = dict(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=4, num_attention_heads=2,
                num_key_value_heads=1, intermediate_size=128, cross_attention_layers=[1, 3],
                max_position_embeddings=1024, bos_token_id=token_id("<|begin_of_text|>"), eos_token_id=token_id(EOT),
                pad_token_id=token_id("<|finetune_right_pad_id|>"))
    config = MllamaConfig(vision_config=vision, text_config=text, image_token_index=token_id("<|image|>"))
    torch.manual_seed(seed)
    model = MllamaForConditionalGeneration(config)
    # The language model sees the image only through its cross-attention layers, and each one's output is
    # scaled by tanh(gate) with the gates initialised to 0: a fresh random Mllama ignores the image entirely
    # (the pretrained 11B has learned gates). Open them (a test checks that the image changes the logits).
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate")):
                p.fill_(1.0)
        # The frozen output layer at the default std 0.02 bounds every logit by |row| * |h| = 0.02 * hidden_size
        # = 1.3 after the final RMSNorm (|h| = sqrt(64)), so no adapter could bring the loss below about 3
        # (log(vocab) is 5.6); give it a usable scale.
        model.lm_head.weight.normal_(std=0.3)
    return model, processor


if __name__ == "__main__":
    main(sys.argv[1:])

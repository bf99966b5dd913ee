"""
Image captioning by LoRA fine-tuning of Llama 3.2 Vision 11B (homework part 2-3), scored by BLEU (bleu.py).
Unsloth's FastVisionModel (4-bit) on a CUDA machine with unsloth installed; otherwise transformers'
MllamaForConditionalGeneration with peft LoRA on the same projections (4-bit bitsandbytes on CUDA, full
precision on CPU). The base model stays frozen; only the LoRA matrices train. No Trainer: a plain loop.

    python caption.py --train --data_dir=data/caption --out_dir=out/caption --max_steps=250
    python caption.py --predict --data_dir=data/caption --out_dir=out/caption --submission=submission.json
    python caption.py --train --tiny --max_steps=20     # a tiny random Mllama built in code: runs on a CPU in seconds

Training writes out_dir/adapter (the LoRA adapter with the best validation BLEU, save_pretrained format),
out_dir/last (the latest adapter with optimizer state, to resume: run the same command again) and log lines.
"""
import io
import json
import os
import random
import re
import shutil
import sys
import time

import pyarrow.parquet as pq
import torch
from PIL import Image

from bleu import corpus_bleu, parse_overrides

# -----------------------------------------------------------------------------
# configuration: every constant below can be overridden as --name=value
train = False           # fine-tune on data_dir/train_data.parquet, validate on valid_data.parquet
predict = False         # caption data_dir/test_data.parquet into submission
tiny = False            # a tiny randomly initialised Mllama and processor built in code (no download)
data_dir = "data/caption"
out_dir = "out/caption"
submission = "submission.json"
model_name = "unsloth/Llama-3.2-11B-Vision-Instruct"  # a Hub id or a local folder (also --model=...)
backend = "auto"        # "auto" (unsloth if CUDA and unsloth are there, else transformers), "unsloth", "transformers"
load_in_4bit = True     # on CUDA: 4-bit NF4 base weights (QLoRA); ignored on CPU
instruction = "Write a one-sentence caption for this image."
# LoRA (Hu et al. 2021): W + (alpha / r) * B A on every attention and MLP projection, vision and language
lora_r = 16
lora_alpha = 16
lora_dropout = 0.0
finetune_vision = True  # also adapt the vision encoder's projections (the unsloth notebook does)
# training
max_steps = 250         # optimizer steps; 0 = epochs over the training set
epochs = 1
batch_size = 2          # images per forward pass
grad_accum = 4          # forward passes per optimizer step: effective batch = batch_size * grad_accum
lr = 2e-4
warmup_steps = 5
weight_decay = 0.01
grad_clip = 1.0
optimizer_name = "adamw"  # "adamw" or "adamw_8bit" (bitsandbytes, CUDA only)
eval_every = 50         # steps between validation BLEU checks (and at the end)
val_samples = 100       # validation images captioned for BLEU (0 = all)
max_new_tokens = 48     # caption length limit when generating
predict_batch_size = 8
log_every = 10
max_minutes = 0.0       # stop cleanly (adapter and optimizer state saved in out_dir/last) after this long; 0 = no limit
seed = 3407
num_threads = 2         # CPU threads
# -----------------------------------------------------------------------------

EOT = "<|eot_id|>"      # Llama 3's end of turn: the assistant's caption ends with it, generation stops on it
IGNORE_INDEX = -100     # cross_entropy skips these label positions


# ----------------------------------------------------------------------------- data
class CaptionDataError(ValueError):
    """Bad input; the message names the file and the row."""


def load_split(path, need_caption):
    """Rows of a homework parquet as dicts {image: PIL RGB, caption?, references?, idx?}. The image column is a
    struct {bytes, path} or plain binary. Anything missing or unreadable is a CaptionDataError (file, row)."""
    name = os.path.basename(path)
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several kinds for a file that is not parquet
        raise CaptionDataError(f"{name}: cannot read parquet ({type(e).__name__}: {e})") from None
    required = ["image"] + (["caption"] if need_caption else ["idx"])
    for column in required:
        if column not in table.column_names:
            raise CaptionDataError(f"{name}: missing column '{column}' (has {table.column_names})")
    rows = []
    for row_number, row in enumerate(table.to_pylist()):
        image = row["image"]
        data = image.get("bytes") if isinstance(image, dict) else image
        if not data:
            raise CaptionDataError(f"{name}: row {row_number}: field 'image' has no bytes")
        try:
            with Image.open(io.BytesIO(data)) as opened:
                row["image"] = opened.convert("RGB")
        except Exception as e:
            raise CaptionDataError(f"{name}: row {row_number}: cannot decode image ({type(e).__name__}: {e})") from None
        if need_caption:
            if not isinstance(row["caption"], str) or not row["caption"].strip():
                raise CaptionDataError(f"{name}: row {row_number}: field 'caption' is empty")
            row["references"] = row.get("references") or [row["caption"]]
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


def lora_targets():
    return f"({LANGUAGE_TARGETS}|{VISION_TARGETS})" if finetune_vision else LANGUAGE_TARGETS


def load_model(adapter_dir=None, trainable=True):
    """(model with LoRA, processor, backend name). adapter_dir: a saved adapter to load instead of new LoRA."""
    use_cuda = torch.cuda.is_available()
    chosen = backend
    if chosen == "auto":
        chosen = "unsloth" if (use_cuda and not tiny and _has_unsloth()) else "transformers"
    if chosen == "unsloth":
        return (*load_unsloth(adapter_dir, trainable), "unsloth")
    if tiny:
        base, processor = build_tiny_model()
    else:
        from transformers import AutoProcessor, BitsAndBytesConfig, MllamaForConditionalGeneration
        quantize = use_cuda and load_in_4bit
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                          bnb_4bit_compute_dtype=torch.bfloat16) if quantize else None
        base = MllamaForConditionalGeneration.from_pretrained(
            model_name, quantization_config=quantization, dtype=torch.bfloat16 if use_cuda else torch.float32,
            device_map={"": 0} if use_cuda else None)
        processor = AutoProcessor.from_pretrained(model_name)
        if processor.tokenizer.pad_token is None:   # Llama 3's reserved padding token, as unsloth uses it
            processor.tokenizer.pad_token = "<|finetune_right_pad_id|>"
        if quantize:
            from peft import prepare_model_for_kbit_training
            base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=True)
        elif use_cuda:
            base.gradient_checkpointing_enable()
    if use_cuda and tiny:
        base = base.cuda()
    from peft import LoraConfig, PeftModel, get_peft_model
    if adapter_dir:
        model = PeftModel.from_pretrained(base, adapter_dir, is_trainable=trainable)
    else:
        model = get_peft_model(base, LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                                                target_modules=lora_targets(), bias="none"))
    return model, processor, "transformers"


def _has_unsloth():
    import importlib.util
    return importlib.util.find_spec("unsloth") is not None


def load_unsloth(adapter_dir, trainable):
    """The same model through unsloth (GPU only): 4-bit base, its LoRA on the same projections, its gradient
    checkpointing. An adapter folder loads through from_pretrained, as in unsloth's notebooks."""
    from unsloth import FastVisionModel
    model, processor = FastVisionModel.from_pretrained(adapter_dir or model_name, load_in_4bit=load_in_4bit,
                                                       use_gradient_checkpointing="unsloth")
    if adapter_dir is None:
        model = FastVisionModel.get_peft_model(
            model, finetune_vision_layers=finetune_vision, finetune_language_layers=True,
            finetune_attention_modules=True, finetune_mlp_modules=True, r=lora_r, lora_alpha=lora_alpha,
            lora_dropout=lora_dropout, bias="none", random_state=seed)
    (FastVisionModel.for_training if trainable else FastVisionModel.for_inference)(model)
    return model, processor


def set_mode(model, used_backend, training):
    """unsloth patches its model for training or for fast generation; switch between them around validation."""
    if used_backend == "unsloth":
        from unsloth import FastVisionModel
        (FastVisionModel.for_training if training else FastVisionModel.for_inference)(model)


# A Jinja chat template with Llama 3.2 Vision's format for an image and one user turn (the real processor
# brings its own): no system message when an image is present, the image token before the instruction.
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}<|image|>"
    "{% else %}{{ content['text'] }}{% endif %}{% endfor %}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
TINY_SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                       EOT, "<|finetune_right_pad_id|>", "<|image|>"]


def build_tiny_model():
    """A randomly initialised Mllama (92k parameters) with a byte-level tokenizer and a 32x32 one-tile image
    processor: the same classes and code paths as the 11B model, at a size a CPU runs in seconds."""
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
    text = MllamaTextConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                            num_key_value_heads=1, intermediate_size=64, cross_attention_layers=[1, 3],
                            max_position_embeddings=1024, bos_token_id=token_id("<|begin_of_text|>"),
                            eos_token_id=token_id(EOT), pad_token_id=token_id("<|finetune_right_pad_id|>"))
    config = MllamaConfig(vision_config=vision, text_config=text, image_token_index=token_id("<|image|>"))
    torch.manual_seed(seed)  # the same random base every time, so a saved adapter fits it again
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
        # The frozen output layer at the default std 0.02 caps every logit near 0.02 * hidden_size = 0.6 after
        # the final RMSNorm, so no adapter could lower the loss much below log(vocab); give it a usable scale.
        model.lm_head.weight.normal_(std=0.3)
    model.generation_config.pad_token_id = text.pad_token_id
    return model, processor


# ----------------------------------------------------------------------------- prompts and batches
def chat_prompt(processor):
    """The user turn (image + instruction) and the assistant header, in the model's own chat template."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def make_batch(processor, images, captions=None):
    """Processor outputs for images with the prompt; with captions, the caption and <|eot_id|> follow the prompt
    and `labels` keeps only those tokens: prompt, image token and padding are IGNORE_INDEX (-100)."""
    tokenizer = processor.tokenizer
    prompt = chat_prompt(processor)
    texts = [prompt] * len(images) if captions is None else [prompt + c.strip() + EOT for c in captions]
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


def clean_caption(text):
    """A generated caption as one clean sentence: first line, first sentence, single spaces, final period."""
    text = text.strip().split("\n")[0]
    text = re.sub(r"^(caption|answer)\s*:\s*", "", text, flags=re.IGNORECASE).strip(" \"'")
    text = re.split(r"(?<=[.!?])[\"']?\s", text)[0]
    text = re.sub(r"\s+", " ", text).strip()
    if text and text[-1] not in ".!?":
        text += " ."
    return text


@torch.no_grad()
def generate_captions(model, processor, images, batch=8):
    """Greedy captions for a list of PIL images, in order."""
    model.eval()
    device = next(model.parameters()).device
    captions = []
    for s in range(0, len(images), batch):
        inputs = make_batch(processor, images[s:s + batch]).to(device)
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                eos_token_id=processor.tokenizer.convert_tokens_to_ids(EOT),
                                pad_token_id=processor.tokenizer.pad_token_id)
        new_tokens = output[:, inputs["input_ids"].shape[1]:]
        captions += [clean_caption(t) for t in processor.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    return captions


def validation_bleu(model, processor, rows):
    """Corpus BLEU (bleu.py, sacrebleu's defaults) of greedy captions against all references of each image."""
    hypotheses = generate_captions(model, processor, [r["image"] for r in rows], predict_batch_size)
    n_refs = max(len(r["references"]) for r in rows)
    # one stream per reference position; an image with fewer references repeats its first one
    streams = [[(r["references"] + r["references"][:1] * n_refs)[k] for r in rows] for k in range(n_refs)]
    return corpus_bleu(hypotheses, streams).score, hypotheses


# ----------------------------------------------------------------------------- training
def learning_rate(step, total_steps):
    """Linear warmup, then linear decay to zero at the last step (the unsloth notebook's schedule)."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    return lr * max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def make_optimizer(model):
    parameters = [p for p in model.parameters() if p.requires_grad]
    if optimizer_name == "adamw_8bit":
        import bitsandbytes as bnb
        return bnb.optim.AdamW8bit(parameters, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)


def train_model(data_dir, out_dir):
    torch.manual_seed(seed)
    train_rows = load_split(os.path.join(data_dir, "train_data.parquet"), need_caption=True)
    val_rows = load_split(os.path.join(data_dir, "valid_data.parquet"), need_caption=True)
    val_rows = val_rows[:val_samples] if val_samples else val_rows
    last_dir, best_dir = os.path.join(out_dir, "last"), os.path.join(out_dir, "adapter")
    resuming = os.path.exists(os.path.join(last_dir, "state.pt"))
    model, processor, used_backend = load_model(last_dir if resuming else None, trainable=True)
    device = next(model.parameters()).device
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(f"backend {used_backend} on {device}: {trainable:,} trainable LoRA parameters of {total:,} "
          f"({100 * trainable / total:.2f} %)")

    optimizer = make_optimizer(model)
    batches_per_epoch = len(train_rows) // batch_size
    total_steps = max_steps or epochs * batches_per_epoch // grad_accum
    step, best_bleu = 0, -1.0
    if resuming:
        state = torch.load(os.path.join(last_dir, "state.pt"), map_location=device, weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        step, best_bleu = state["step"], state["best_bleu"]
        print(f"resuming from {last_dir} at step {step}")

    def micro_batch(k):
        # micro-batch k of the whole run: the order of an epoch depends only on (seed, epoch), so a resumed
        # run sees the batches it would have seen
        epoch, position = divmod(k, batches_per_epoch)
        order = list(range(len(train_rows)))
        random.Random(seed + epoch).shuffle(order)
        rows = [train_rows[i] for i in order[position * batch_size:(position + 1) * batch_size]]
        return make_batch(processor, [r["image"] for r in rows], [r["caption"] for r in rows]).to(device)

    start, start_step, loss_sum, loss_steps = time.time(), step, 0.0, 0
    while step < total_steps:
        model.train()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, total_steps)
        for micro in range(grad_accum):
            loss = model(**micro_batch(step * grad_accum + micro)).loss / grad_accum
            loss.backward()
            loss_sum += loss.item()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step, loss_steps = step + 1, loss_steps + 1
        if step % log_every == 0 or step == total_steps:
            rate = (step - start_step) * batch_size * grad_accum / (time.time() - start)
            print(f"step {step}/{total_steps} loss {loss_sum / loss_steps:.4f} "
                  f"lr {learning_rate(step, total_steps):.2e} {rate:.2f} captions/s, "
                  f"about {(total_steps - step) * batch_size * grad_accum / rate / 60:.1f} min left")
            loss_sum, loss_steps = 0.0, 0
        if step % eval_every == 0 or step == total_steps:
            set_mode(model, used_backend, training=False)
            score, hypotheses = validation_bleu(model, processor, val_rows)
            set_mode(model, used_backend, training=True)
            print(f"step {step}: validation BLEU {score:.2f} on {len(val_rows)} images; e.g. {hypotheses[0]!r}")
            if score > best_bleu:
                best_bleu = score
                model.save_pretrained(best_dir)
                print(f"  best so far: adapter saved to {best_dir}")
        out_of_time = max_minutes > 0 and time.time() - start > max_minutes * 60
        if step % eval_every == 0 or step == total_steps or out_of_time:
            save_resume_point(model, optimizer, step, best_bleu, last_dir)
        if out_of_time:
            print(f"stopped after {max_minutes} minutes at step {step}/{total_steps}; run the same command to resume")
            break
    else:
        print(f"done: best validation BLEU {best_bleu:.2f}, adapter in {best_dir}")
    return best_bleu


def save_resume_point(model, optimizer, step, best_bleu, last_dir):
    """Adapter and optimizer state written side by side into a new folder that then replaces the old one, so
    the two always belong to the same step."""
    temporary = last_dir + ".tmp"
    shutil.rmtree(temporary, ignore_errors=True)
    model.save_pretrained(temporary)
    torch.save({"optimizer": optimizer.state_dict(), "step": step, "best_bleu": best_bleu},
               os.path.join(temporary, "state.pt"))
    shutil.rmtree(last_dir, ignore_errors=True)
    os.replace(temporary, last_dir)


# ----------------------------------------------------------------------------- prediction
def write_submission(data_dir, out_dir, submission):
    """[{"idx": int, "output": str}] for every test image, in idx order, each idx exactly once."""
    rows = load_split(os.path.join(data_dir, "test_data.parquet"), need_caption=False)
    indices = [r["idx"] for r in rows]
    if len(set(indices)) != len(indices):
        duplicate = next(i for i in indices if indices.count(i) > 1)
        raise CaptionDataError(f"test_data.parquet: idx {duplicate} appears more than once")
    adapter_dir = os.path.join(out_dir, "adapter")
    if not os.path.isdir(adapter_dir):
        raise SystemExit(f"{adapter_dir} not found: train first (python caption.py --train --out_dir={out_dir})")
    model, processor, _ = load_model(adapter_dir, trainable=False)
    rows.sort(key=lambda r: r["idx"])
    start = time.time()
    captions = generate_captions(model, processor, [r["image"] for r in rows], predict_batch_size)
    with open(submission, "w") as f:
        json.dump([{"idx": r["idx"], "output": c} for r, c in zip(rows, captions)], f, indent=1)
    print(f"wrote {len(rows)} captions to {submission} ({time.time() - start:.0f} s); e.g. {captions[0]!r}")


if __name__ == "__main__":
    # --model=... is the short name of model_name (a variable called `model` holds the network below)
    arguments = ["--model_name" + a[len("--model"):] if a.startswith("--model=") else a for a in sys.argv[1:]]
    if parse_overrides(arguments, globals()):
        sys.exit(f"unexpected arguments: {sys.argv[1:]} (every option is --name=value)")
    torch.set_num_threads(num_threads)
    try:
        if train:
            train_model(data_dir, out_dir)
        if predict:
            write_submission(data_dir, out_dir, submission)
        if not (train or predict):
            print(__doc__)
    except (CaptionDataError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")

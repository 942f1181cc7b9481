"""One training run of tests/test_fsdp.py: a tiny random-init HF model with a LoRA, a few
AdamW steps on a fixed global batch, either in one process on the whole batch (``--mode
single``) or FSDP2-sharded under ``torch.distributed.run`` (``--mode fsdp``), each rank on its
rows r::world. Writes (rank 0) the trained weights and facts about the run to ``--out``."""

from __future__ import annotations

import argparse
import os

import torch
import transformers

import adapterkit
from adapterkit.core.optim import TaskAwareAdamW
from adapterkit.engine import fsdp
from adapterkit.engine.distributed import exit_now, shutdown_distributed

ROWS, SEQ, VOCAB = 8, 12, 96


def build(kind: str, adapters: bool = True):
    torch.manual_seed(0)
    if kind == "llama":
        cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        model = transformers.LlamaForCausalLM(cfg)
        if adapters:
            adapterkit.add_adapters(model, {"method": "lora", "r": 4})
    else:  # a classification head (trained by default) in the root unit; blocks: embeddings + layers
        cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=64, num_labels=3,
                                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        model = transformers.BertForSequenceClassification(cfg)
        if adapters:
            adapterkit.add_adapters(model, {"method": "lora", "r": 4, "tasks": ["a", "b"], "sharing": "per_task"})
    return model


def generation_check(out: str):
    """Sharded ``generate()`` of a tiny BART with a LoRA (its encoder runs before any root forward;
    the ranks get different row counts and lengths): rank 0's output must be the unsharded one."""
    torch.manual_seed(0)
    cfg = transformers.BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2,
                                  encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                  decoder_ffn_dim=64, max_position_embeddings=64, pad_token_id=1, bos_token_id=0,
                                  eos_token_id=2, decoder_start_token_id=2)
    model = transformers.BartForConditionalGeneration(cfg)
    adapterkit.add_adapters(model, {"method": "lora", "r": 4})
    with torch.no_grad():  # a LoRA that changes the outputs
        for p in adapterkit.core.base.get_container(model).parameters():
            p.normal_(0, 0.5)
    model.eval()
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    ids = torch.randint(3, VOCAB, (3, 7), generator=torch.Generator().manual_seed(2))
    kw = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 1, "num_beams": 1}
    with torch.no_grad():
        ref = model.generate(input_ids=ids[0::2], **kw)
        fsdp.shard_model(model)
        mine = ids[rank::world]  # rank 0: rows 0, 2; rank 1: row 1
        got = model.generate(input_ids=mine, **{**kw, "max_new_tokens": 6 if rank == 0 else 3})
    if rank == 0:
        torch.save({"ref": ref, "got": got}, out)


def batch(kind: str):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (ROWS, SEQ), generator=g)
    labels = ids if kind == "llama" else torch.randint(0, 3, (ROWS,), generator=g)
    return ids, labels


def train(model, opt, ids, labels, steps, kind):
    losses = []
    for _ in range(steps):
        if kind == "llama":
            loss = model(input_ids=ids, labels=labels).loss
        else:
            with adapterkit.route("a"):
                loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def make_opt(model):
    return TaskAwareAdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.01)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["single", "fsdp"], required=True)
    ap.add_argument("--model", choices=["llama", "bert", "bart-generate"], default="llama")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--resume-at", type=int, default=0, help="fsdp: gather the state after this many steps, "
                    "load it into a freshly sharded model and optimizer, train on")
    ap.add_argument("--bf16", action="store_true", help="fsdp: the bf16 mixed-precision policy")
    ap.add_argument("--autocast", action="store_true", help="train under bf16 autocast")
    ap.add_argument("--cast-frozen", action="store_true", help="frozen weights stored in bf16 (train.bf16 does so)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    if a.model == "bart-generate":
        torch.distributed.init_process_group("gloo")
        generation_check(a.out)
        torch.distributed.barrier()  # as below: no rank tears the group down while another still works
        torch.distributed.destroy_process_group()
        return
    ids, labels = batch(a.model)
    rank, world = 0, 1
    if a.mode == "fsdp":
        torch.distributed.init_process_group("gloo")
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    ids, labels = ids[rank::world], labels[rank::world]
    model = build(a.model)
    tagged_before = sorted(n for n, p in model.named_parameters() if getattr(p, "_adapterkit_task_stacked", False))
    if a.cast_frozen:
        adapterkit.cast_frozen(model, torch.bfloat16)
    seen = set()
    first_block = fsdp.block_modules(model)[0][1]
    first_block.register_forward_hook(lambda m, args, out: seen.add(str((out[0] if isinstance(out, tuple) else out).dtype)))
    mp = fsdp.mixed_precision(a.bf16)
    if a.mode == "fsdp":
        fsdp.shard_model(model, mp_policy=mp)
    elif a.bf16:
        raise SystemExit("--bf16 is for --mode fsdp")
    opt = make_opt(model)
    facts = {"sharded": fsdp.is_sharded(model), "world": world, "numel": fsdp.local_numel(model),
             "tagged_before": tagged_before,
             "tagged_after": sorted(n for n, p in model.named_parameters()
                                    if getattr(p, "_adapterkit_task_stacked", False)),
             "dtensors": sum(type(p).__name__ == "DTensor" for p in model.parameters())}
    facts["stored_dtypes"] = sorted({f"{'trainable' if p.requires_grad else 'frozen'} {p.dtype}"
                                     for p in model.parameters()})
    first = a.resume_at if a.resume_at else a.steps
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.autocast)
    with amp:
        losses = train(model, opt, ids, labels, first, a.model)
    if a.resume_at:
        state, ostate = fsdp.full_trainable_state(model), fsdp.full_optimizer_state(opt)
        if rank == 0:  # what the engine does: rank 0 writes, every rank reads the file back
            torch.save({"state": state, "opt": ostate}, a.out + ".ckpt")
        torch.distributed.barrier()
        ck = torch.load(a.out + ".ckpt", weights_only=True)
        model = build(a.model)  # the initial weights again: everything trained comes from the checkpoint
        if a.cast_frozen:
            adapterkit.cast_frozen(model, torch.bfloat16)
        fsdp.shard_model(model, mp_policy=mp)
        opt = make_opt(model)
        fsdp.load_trainable_state(model, ck["state"])
        fsdp.load_optimizer_state(opt, ck["opt"])
        again = fsdp.full_trainable_state(model)
        facts["reload_exact"] = all(torch.equal(again[n], ck["state"][n]) for n in ck["state"])
        o2 = fsdp.full_optimizer_state(opt)
        facts["reload_opt_exact"] = all(
            torch.equal(o2["state"][k][s], v) for k, st in ck["opt"]["state"].items() for s, v in st.items())
        with amp:
            losses += train(model, opt, ids, labels, a.steps - a.resume_at, a.model)
    state = fsdp.full_trainable_state(model)
    ostate = fsdp.full_optimizer_state(opt)
    facts["block_output_dtypes"] = sorted(seen)
    facts["state_types"] = sorted({type(t).__name__ for t in state.values()})
    facts["trainable_dtypes"] = sorted({str(t.dtype) for t in state.values()})
    if world > 1:  # the mean loss over the global batch, as one process sees it
        t = torch.tensor(losses)
        torch.distributed.all_reduce(t)
        losses = (t / world).tolist()
    adapters = fsdp.full_adapter_state(model)
    if rank == 0:
        adapterkit.save_adapters(model, a.out + ".adapters", state_dict=adapters)
        torch.save({"state": state, "opt": ostate, "facts": facts, "losses": losses}, a.out)
    if a.mode == "fsdp":
        shutdown_distributed()  # every rank waits for rank 0's writes, then the group goes


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    main()
    # the work is done and written: leave as the CLI's finished ranks do, without the interpreter's
    # C++ teardown, where gloo's threads aborted (SIGABRT) even after shutdown_distributed. An error
    # in main() still exits non-zero before this.
    exit_now(0)

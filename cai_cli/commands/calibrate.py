"""``cai plan --calibrate``: load the policy with its engine and time real batches (a scoring
pass, a short generation) and a training step of finetune's model, then set the device figures
of the estimate to what they measured. Writes nothing."""

from __future__ import annotations

import time

from cai_cli import ui
from cai_cli.commands.costs import Cost, Planner, Tally
from cai_cli.errors import UserError


def calibrate(planner: Planner) -> list[str]:
    """Load the policy with its engine, time a scoring pass over critique-sized prompts and a
    short generation, load finetune's model through transformers and time a training step, and
    set the device figures to what they measured (``planner.assume``). Returns lines for the
    report, the last one the ``--assume`` options that reproduce the figures."""
    from cai_cli.constitution import load_constitution
    from cai_cli.engines import load_backend
    from cai_cli.engines.base import SamplingParams
    from cai_cli.engines.prompts import critique_prompt, resolve_format
    from cai_cli.stages.generate_sl import Draws

    config, assume, price = planner.config, planner.assume, planner.price
    if config.models.policy.remote:
        raise UserError("--calibrate times models on this machine, and models.policy is behind a "
                        "server; leave --calibrate out, or set the figures with --assume")
    policy = planner.engine(("generate-sl", "models.policy"), config.models.policy,
                            "models.policy")
    prompts = planner.ctx.output("generate-sl")["prompts"]
    rows = min(policy.batch, 8)
    sample = (prompts * rows)[:rows]
    ui.info(f"calibrating: loading {policy.name} ({policy.kind} on {policy.device.name})")
    started = time.perf_counter()
    backend = load_backend(config.models.policy, "models.policy")
    loaded = time.perf_counter() - started
    fmt = resolve_format(config.generate_sl.prompt_format, policy.counter,
                         "generate_sl.prompt_format")
    draws = Draws(config, load_constitution(config.constitution_paths), sample[0])
    answer = "I can help with that. " * 16
    long = [critique_prompt(p.text, answer, draws.principles[0], draws.examples, fmt)
            for p in sample]
    # Prompt processing: a scoring pass over critique-sized prompts (shared prefixes once).
    tally = Tally()
    price.calls(policy, long, [0] * len(long), 0, tally, Cost())
    backend.score_options(long[:2], ("A", "B"))  # warm-up
    started = time.perf_counter()
    backend.score_options(long, ("A", "B"))
    scored = time.perf_counter() - started
    flops = 2 * policy.size.body * tally.computed_tokens / scored
    # Decoding: 16 sampled tokens after the same prompts (a critique turn's context), the prompts
    # priced at the rate just measured.
    started = time.perf_counter()
    results = backend.generate(long, SamplingParams(max_new_tokens=16, temperature=1.0),
                               seeds=list(range(len(long))))
    generated = time.perf_counter() - started
    backend.close()
    steps = max(getattr(r, "tokens", 0) for r in results) or 1
    prefill = 2 * policy.size.body * tally.computed_tokens / flops
    step = max(generated - prefill, 1e-3) / steps
    price.decode_scale = 1.0
    scale = step / price.decode_step(policy, rows, tally.computed_tokens + rows * steps // 2)
    bare = _time_training(planner)
    train_flops = bare * assume["train_efficiency"]
    # The measured figures replace the assumed ones for every model on this device.
    device, options = policy.device, []
    load = max(loaded - policy.weight_bytes / 1e9, 0.2)
    if device.gpu:
        peak = device.flops / assume["mfu"]
        updates = {"mfu": flops / peak, "train_mfu": train_flops / peak}
    else:
        updates = {"cpu_gflops": flops / 1e9, "cpu_train_gflops": train_flops / 1e9}
    updates["decode_scale"] = scale
    if policy.kind == "vllm":  # the load was mostly vLLM starting: graph capture, compilation
        start = load - assume["load_s"]
        updates["engine_start_s"] = max(start * 3 if config.models.policy.enforce_eager
                                        else start, 0.0)
    else:
        updates["load_s"] = load
    for key, value in updates.items():
        if key not in assume.given:
            assume.values[key] = value
            assume.given.add(key)
            options.append(f"--assume {key}={value:.3g}")
    price.decode_scale = assume["decode_scale"]
    planner.engines.clear()
    planner.roles.clear()
    planner.devices.clear()
    return [f"model load {loaded:.1f} s",
            f"prompt processing: {tally.computed_tokens:,} tokens in {scored:.1f} s = "
            f"{flops / 1e9:.0f} GFLOP/s",
            f"decoding: {steps} steps of {rows} rows in {generated - prefill:.1f} s = "
            f"{step * 1e3:.0f} ms a step ({scale:.2f}x the assumed figures)",
            f"training: a bare step {bare / 1e9:.0f} GFLOP/s, x {assume['train_efficiency']:g} "
            f"(train_efficiency) = {train_flops / 1e9:.0f} GFLOP/s in a stage",
            "reuse these figures without --calibrate: " + " ".join(options)]


def _time_training(planner: Planner) -> float:
    """FLOP/s of a training step of finetune's model at its micro-batch size and LoRA settings
    (the second of two steps, so start-up is not counted), on 128-token rows."""
    import torch

    from cai_cli.engines import models
    from cai_cli.stages import finetune, training

    config, settings = planner.config, planner.config.finetune
    model_config, key = finetune.base_model(config)
    engine = planner.engine(("finetune", key), model_config, key)
    device = models.check_device(model_config, key)
    ui.info(f"calibrating: a training step of {engine.name}")
    model = models.load_causal_lm(model_config, key, device).train()
    if settings.lora.enabled:
        import peft

        model = peft.get_peft_model(model, training.peft_config(settings.lora, "CAUSAL_LM"))
    batch, length = settings.training.per_device_batch_size, min(128, settings.training.max_length)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, length), generator=generator).to(device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-9)
    seconds = 0.0
    for _ in range(2):
        started = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
    del model, optimizer
    models.free_device_memory()
    factor = 4 if settings.lora.enabled else 6
    return factor * (engine.size.body + engine.size.head) * batch * length / seconds

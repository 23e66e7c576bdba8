"""Experiment: the built-in LLaVA recipe with one warm-up + cosine per curriculum stage (restarts)."""
import sys, json, time, torch, numpy as np
torch.set_num_threads(2)
from torch import nn
from pumer_plug.evaluation.tasks import builtin_llava_training as T
from pumer_plug.evaluation.tasks.builtin_llava import build_builtin_llava, build_llava_tokenizer, evaluate_llava
from pumer_plug.evaluation.tasks.builtin_training import AuxiliaryHeads, Stage
from pumer_plug.evaluation.tasks.builtin_llava_data import collate_llava
from pumer_plug.evaluation.tasks.digits import DigitsVQA
from pumer_plug.evaluation.training.loop import decay_groups, schedule, train_steps

peaks = [float(x) for x in sys.argv[1].split(",")]
steps = [int(x) for x in sys.argv[2].split(",")]
cur = (Stage(1, 1, steps[0]), Stage(2, 2, steps[1]), Stage(4, 2, steps[2]))
tok = build_llava_tokenizer(); model = build_builtin_llava(0)
stages = T.curriculum_data(cur, 64, 0)
digit_ids = torch.tensor([tok.token_to_id(str(d)) for d in range(10)])
heads = AuxiliaryHeads(model.config.text_config.hidden_size)
trained = nn.ModuleList([model, heads])
opt = torch.optim.AdamW(decay_groups(trained, 0.01), lr=peaks[0], betas=(0.9, 0.98))
model.train(); t0 = time.perf_counter()
for k, ((data, n), peak) in enumerate(zip(stages, peaks)):
    for g in opt.param_groups:
        g["lr"] = peak; g["initial_lr"] = peak
    sched = schedule(opt, "cosine", n, 0.06, min_lr_rate=0.05)
    def batches():
        for step in range(n):
            chosen = [data.examples[i] for i in range(step * 64, (step + 1) * 64)]
            seeds = [data._noise_base + step * 64 + i for i in range(64)]
            inputs, _ = collate_llava(chosen, tok, data.noise_std, seeds, with_answer=True)
            yield inputs, chosen
    for v in train_steps(batches(), lambda b: T.step_losses(model, heads, *b, tok, digit_ids), opt, sched, model.parameters()):
        pass
    print("stage", k, "done", time.perf_counter() - t0, v, flush=True)
model.eval()
secs = time.perf_counter() - t0
scores = evaluate_llava(model, tok, DigitsVQA("val", 1000, 0))
print(json.dumps({"peaks": peaks, "steps": steps, "train_seconds": secs, **scores}, indent=1))

import sys, json, torch
torch.set_num_threads(2)
from pumer_plug.evaluation.tasks.builtin_llava import train_builtin_llava
out = sys.argv[1]
kw = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
m = train_builtin_llava(out, seed=int(kw.pop("seed", 0)), progress=False, **kw)
print(json.dumps({k: m[k] for k in ("val_accuracy", "val_accuracy_by_question_type", "train_seconds", "final_train_losses", "load_average_1min")}, indent=1))

import torch, time
from pumer_plug import apply
from pumer_plug.config import PumerConfig
from pumer_plug.evaluation.tasks import get_task, TaskOptions, load_config
torch.set_num_threads(2)
task = get_task("builtin-llava", TaskOptions())
model = task.load_model(torch.device("cpu"))
val = list(task.batches("val", 64, 1000))
def acc(method=None, cfg=None):
    if method is None: return task.accuracy(model, val)
    with apply(model, adapter=task.adapter, config=cfg, method=method):
        return task.accuracy(model, val)
V=144
for name, kw in [("A' preset L0 k.625 r.125", dict(reduction_layers=[0], prune_ratio=0.625, image_merge_ratio=0.125)),
                 ("H L0 k.6875 r.0625", dict(reduction_layers=[0], prune_ratio=0.6875, image_merge_ratio=0.0625)),
                 ("B L0 prune-only k.75", dict(reduction_layers=[0], prune_ratio=0.75, image_merge_ratio=0.0)),
                 ("B first", dict(reduction_layers=[0], prune_ratio=0.75, image_merge_ratio=0.0, saliency_heads="first")),
                 ("G L1 prune-only k.75", dict(reduction_layers=[1], prune_ratio=0.75, image_merge_ratio=0.0)),
                 ]:
    cfg = PumerConfig(text_merge_ratio=0.0, **kw)
    print(name, acc("pumer", cfg), flush=True)

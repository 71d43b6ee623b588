"""AlexNet's filter groups (Krizhevsky et al. 2012; Ioannou's thesis): g = 1, 2, 4 groups on conv2, conv4 and conv5
on ImageNet, in Caffe's bvlc_alexnet layout (227x227 crops, LRN, dropout, Caffe's initialisation).

Recipe (Caffe's bvlc_alexnet solver): SGD momentum 0.9, batch 256, lr 0.01 divided by 10 every 20 epochs, weight
decay 5e-4 (not on biases), 90 epochs. The report gives top-1/top-5 error beside the thesis', and what the groups
of conv1 learned: its kernels in one panel per conv2 group, with a colour score per group.
    python launch.py --config experiments/alexnet_groups.py --config.data.data_dir=DIR              # imagenet2012
    python launch.py --config experiments/alexnet_groups.py:imagenette --config.data.data_dir=DIR   # 10 classes
    python launch.py --config experiments/alexnet_groups.py:local   # seconds: a narrow AlexNet, synthetic data
"""
import ml_collections

from gconv.config import base_config, make_local

# The thesis' ImageNet validation top-1 / top-5 accuracy (%) (rootdata/alexnetma.csv).
THESIS_ACCURACY = {1: (58.196, 81.0339), 2: (58.16, 81.86), 4: (56.54, 80.62)}

VARIANTS = ("local", "imagenette")  # the :arg names this file takes


def get_config(arg=None):
    config = base_config()
    config.model = ml_collections.ConfigDict(dict(name="alexnet", groups=1, norm="lrn", width_multiplier=1.0,
                                                  fc_features=4096, dtype="float32"))
    config.data.name = "imagenette" if arg == "imagenette" else "imagenet2012"
    config.data.crop_size = 227
    config.data.batch_size = 256
    config.optim.learning_rate = 0.01
    config.optim.nesterov = False
    config.optim.weight_decay = 5e-4
    config.optim.schedule = "step"
    config.optim.decay_epochs = (20, 40, 60, 80)
    config.num_epochs = 90.0
    config.log_every_steps = 100
    config.eval_every_steps = config.checkpoint_every_steps = 5000
    if arg == "local":  # wiring check: a narrow AlexNet (same layout and groups) on synthetic 67x67 images
        config.model.width_multiplier, config.model.fc_features = 0.25, 256
        config.data.crop_size = 0
        make_local(config, image_size=67)
    return config


def get_sweep(arg=None):
    groups = (1, 2) if arg == "local" else (1, 2, 4)
    paper = arg is None  # the thesis' figures are for ImageNet's 1000 classes
    return [{"name": f"g{g}", "model.groups": g,
             "paper_top1_error": round(100.0 - THESIS_ACCURACY[g][0], 3) if paper else -1.0,
             "paper_top5_error": round(100.0 - THESIS_ACCURACY[g][1], 3) if paper else -1.0} for g in groups]

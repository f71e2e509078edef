"""The names the project defines once: datasets, models by family, class groups, run files.

Plain strings, no imports: the config, the command line and the models read them without
loading torch.
"""

# data.name
DATASETS = ("Cifar10", "Cifar100", "Digits", "ImageNet", "MiniImagenet", "Helena", "MNIST", "INat2018", "PlacesLT")
# decoded from image files under data.root; the original gives them the 224-pixel stem
IMAGE_FILE_DATASETS = ("ImageNet", "MiniImagenet", "INat2018", "PlacesLT")
# a feature table, not images (its only model is TableMLP)
TABLE_DATASETS = ("Helena",)

# model.name, by family
RESNET_MODELS = ("ResNet34", "ResNet18", "ResNeXt50", "IMResNet34", "IMResNet18", "ResNet32", "ResNet50",
                 "ResNet152")
# basic blocks (identity_skip and one_param_bn rebuild them; ResNeXt50 and ResNet50/152 have bottlenecks)
BASIC_BLOCK_MODELS = ("ResNet34", "ResNet18", "IMResNet34", "IMResNet18", "ResNet32")
# torchvision's 224-pixel stem (7x7 stride-2 conv and max-pool) whatever the dataset
LARGE_INPUT_MODELS = ("IMResNet34", "IMResNet18", "ResNet50", "ResNet152")
# torchvision's ImageNet architectures: model.init_weights may load a torchvision state_dict into them
TORCHVISION_MODELS = ("ResNet34", "ResNet18", "ResNeXt50", "IMResNet34", "IMResNet18", "ResNet50", "ResNet152")
SMALL_MODELS = ("TableMLP", "BNLeNet5", "BNMLP", "MLResBlock")
# the small networks whose width and depth come from model.mlp_features_d / mlp_hlayer_n
MLP_MODELS = ("BNMLP", "MLResBlock")
MODELS = RESNET_MODELS + SMALL_MODELS
# D, the size of the features the classifier reads (the MLP models: model.mlp_features_d)
FEATURE_DIMS = {"ResNet34": 512, "ResNet18": 512, "IMResNet34": 512, "IMResNet18": 512, "ResNeXt50": 2048,
                "ResNet32": 64, "ResNet50": 2048, "ResNet152": 2048, "TableMLP": 512, "BNLeNet5": 84}

# class groups by training count (SPEC 8): Many n > many_threshold, Few n < few_threshold
GROUPS = ("Many", "Medium", "Few")

# files of a run directory (exp/<data>/<model>/<stage>/<exp_name>/<seed>/)
ARGS_FILE = "args.json"
PROVENANCE_FILE = "provenance.json"
BEST_PARAM_FILE = "best.paramOnly"
CHECKPOINT_FILE = "checkpoint.ckpt"
ACC_FILE = "acc.json"
TOPK_FILE = "topk.json"
CALIBRATION_FILE = "calibration.json"
FDR_FILE = "fdr.json"
SPARSITY_FILE = "sparsity.json"
CONFMAT_FILE = "confMat.npy"
CLASSIFIER_WEIGHT_FILE = "classifier_weight.npy"
PER_CLASS_FILE = "per_class.csv"
METRICS_FILE = "metrics.csv"
TRACK_RECORDS_FILE = "trackRecords.ckpt"
TRAIN_LOG_FILE = "train.log"
BEST_LOG_FILE = "note_bestModel.log"
TAU_SWEEP_CSV = "tau_sweep.csv"
TAU_SWEEP_JSON = "tau_sweep.json"
IMG_DIR = "imgs"
# TensorBoard: the final evaluation's events and the figures each have an events file of their own
# (events.out.tfevents.*<suffix>), which a resumed run or a redraw replaces whole
FINAL_EVENTS_SUFFIX = ".final"
FIGURE_EVENTS_SUFFIX = ".figures"

"""Long-tailed datasets (Digits, CIFAR, ImageNet-LT, Helena, MNIST) in one shape (LTData),
the splits the training loop and the evaluation passes read, and the on-device augmentation."""

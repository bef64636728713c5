"""In-domain self-supervised pretraining of the ResNet backbone on fundus photos without their grades (issue 41).

byol: the method (BYOL: online network, target network as a weight average, loss, collapse measure);
views: the two augmented views of each photo, made on the training device. The command that runs it is
dr_resnet.pretrain; the backbone it writes is loaded by `model.weights=PATH`.
"""

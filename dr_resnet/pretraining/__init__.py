"""In-domain self-supervised pretraining of the ResNet backbone on fundus photos without their grades.

byol: the method (BYOL: online network, target network as a weight average, loss, collapse measure);
views: the two augmented views of each photo, made on the training device; pool: which photos it sees (never
the test split's); run: the command, python -m dr_resnet.pretrain, whose backbone.pt `model.weights=PATH` loads.
"""

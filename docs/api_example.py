from detect.api import load, pretrain, train

cls_run = pretrain(overrides=["train.epochs=1"])  # tools/train_cls.py as a call: .dir .best .backbone .metrics
det_run = train(overrides={"train.epochs": 1, "model.backbone_weights": str(cls_run.backbone)})  # tools/train_det.py
print(det_run.metrics["AP"], det_run.best)  # .dir .best .last .metrics (best.pt's: AP, AP50, coco_stats, ...)
model = load(det_run.best)  # also: an imported Ultralytics .pt, an exported .onnx
results = model.predict("data/synth_cub/CUB_200_2011/images/*/*_0000.jpg", conf=0.25)  # RGB arrays too
for r in results:
    print(r.path, r.boxes.tolist(), r.scores.tolist(), r.class_names)  # boxes: xyxy original pixels
tuned = model.train(overrides=["train.epochs=1"])  # fine-tunes this model (model.weights=its file)

from detect.api import load

model = load("runs/det/default/best.pt", device="cpu")  # also: an imported Ultralytics .pt, an exported .onnx
results = model.predict("data/synth_cub/CUB_200_2011/images/*/*_0000.jpg", conf=0.25)  # RGB arrays too
for r in results:
    print(r.path, r.boxes.tolist(), r.scores.tolist(), r.class_names)  # boxes: xyxy original pixels
metrics = model.val()  # COCO mAP on the checkpoint's validation data, as tools/val_det.py

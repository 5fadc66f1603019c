"""torch -> ONNX: the model factory (:mod:`.models`) and the checked exporter (:mod:`.onnx`)."""

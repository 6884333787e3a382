"""The evaluation harness behind ``activepath bench``: model shapes, fast random builds,
the measured roofline, the layer and generate benches, and their reports.

Pipeline: shapes → build → roofline → (layer | generate) bench → report (+ plots).
"""

"""Windows and features: the one feature code that training and serving share.

``spec.FeatureSpec`` says what a model consumes (versioned, hashed into its manifest),
``windows.Windower`` cuts each source's stream into windows, ``extract.extract_matrix`` turns windows
into a float32 feature matrix.
"""

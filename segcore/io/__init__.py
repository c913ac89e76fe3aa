"""Input/output: URIs over fsspec, scene readers, Zarr stores."""

"""Image datasets: the stored form (uint8 Zarr + labels Parquet), content hashes and the built-in
generators. Imports only `analysis.models`."""

"""A trained adapter at work: its folder on disk (files), loading it onto a base UNet (load), image grids from
pipelines with and without it (sampling), and every export format behind one option check (export)."""

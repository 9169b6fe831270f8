"""The demo application: the whole chain on the embedded demo data (`python -m mimkit.demo`, `mimkit demo`)."""

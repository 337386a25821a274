"""Lightning modules and data modules for the paper's experiments (see conf/ and scripts/)."""

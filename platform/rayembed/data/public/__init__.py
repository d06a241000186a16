"""One module per public training set; importing a module registers its dataset."""

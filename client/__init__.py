"""Hospital side: the Flower ClientApp that trains on the site's own data."""

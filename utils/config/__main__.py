"""``python -m utils.config``: the README's config table."""
from utils.config.flags import print_table

print_table()

"""Names and durations: moved to `skyreg.services.names` (re-exported for older imports)."""

from skyreg.services.names import (
    DNS_LABEL_RE,
    MAX_EXPIRY,
    MAX_TOKEN_NAME,
    generate_app_name,
    is_dns_label,
    parse_expiry,
)

__all__ = [
    "DNS_LABEL_RE",
    "MAX_EXPIRY",
    "MAX_TOKEN_NAME",
    "generate_app_name",
    "is_dns_label",
    "parse_expiry",
]

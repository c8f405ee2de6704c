"""Shared fixtures live in tests/fixtures/, one plugin module per area."""

pytest_plugins = [
    "tests.fixtures.common",
    "tests.fixtures.dicom_data",
    "tests.fixtures.models",
    "tests.fixtures.database",
    "tests.fixtures.peers",
    "tests.fixtures.validators",
]

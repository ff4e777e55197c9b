"""The committed generated protobuf code matches nsam.proto (regenerate: python protos/generate.py)."""

from nsam.protos import generate


def test_generated_code_is_not_stale():
    stale = generate.stale_files(generate.generate(generate.HERE))
    assert stale == [], f"run `python protos/generate.py`; stale: {stale}"


def test_generated_imports_use_the_package_path():
    text = (generate.HERE / "nsam_pb2_grpc.py").read_text()
    assert "from nsam.protos import nsam_pb2" in text

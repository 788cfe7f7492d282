#!/usr/bin/env bash
# check_sha256.sh FILE EXPECTED_SHA256 -- refuses (exit 1, file removed) a file whose hash differs.
set -euo pipefail
file=$1 expected=$2
actual=$(sha256sum "$file" | cut -d' ' -f1)
if [[ "$actual" != "$expected" ]]; then
  rm -f "$file"
  printf '[setup] ERROR: sha256 mismatch for %s\n  expected %s\n  got      %s\nThe file was removed. It is not the release this project pins; re-run the set-up to download it again, or check your package index mirror.\n' \
    "$(basename "$file")" "$expected" "$actual" >&2
  exit 1
fi

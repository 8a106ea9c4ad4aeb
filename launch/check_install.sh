#!/usr/bin/env bash
# Resolves the install (no download of the packages) for every supported Python and
# accelerator extra against PyPI, with the tested constraints:
#   bash launch/check_install.sh
# jax 0.10 needs Python >= 3.11, so 3.10 is expected to fail (checked, not skipped).
set -uo pipefail
cd "$(dirname "$0")/.."
uv=(python -m uv)
status=0
for py in 3.11 3.12; do
  for extra in test tpu gpu; do
    if "${uv[@]}" pip compile setup.py --extra "$extra" -c constraints.txt \
        --python-version "$py" --python-platform x86_64-manylinux_2_31 \
        --no-python-downloads --quiet -o /dev/null; then
      echo "python $py [$extra]: resolves"
    else
      echo "python $py [$extra]: FAILS"; status=1
    fi
  done
done
if "${uv[@]}" pip compile setup.py --python-version 3.10 --no-python-downloads --quiet \
    -o /dev/null 2>/dev/null; then
  echo "python 3.10: resolves (unexpected: update setup.py python_requires)"; status=1
else
  echo "python 3.10: refused as expected (jax 0.10 needs >= 3.11)"
fi
exit $status

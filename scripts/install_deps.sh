# Sourced by demo.sh and test.sh: installs the Debian packages moe needs, only those that are missing.
# Every dependency is a Debian bookworm package (see README "Dependencies"). A script may set
# moe_extra_packages before sourcing (demo.sh adds python3-matplotlib for its plot). clang and libclang-rt-14-dev
# (libFuzzer) are for scripts/fuzz.sh.
moe_packages=(cmake g++ make libeigen3-dev libxsimd-dev xtl-dev nlohmann-json3-dev catch2 libbenchmark-dev clang libclang-rt-14-dev "${moe_extra_packages[@]}")

moe_missing=()
for p in "${moe_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || moe_missing+=("$p")
done
if ((${#moe_missing[@]})); then
  echo "== installing missing Debian packages: ${moe_missing[*]}"
  moe_sudo=()
  [[ $(id -u) -eq 0 ]] || moe_sudo=(sudo)
  "${moe_sudo[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${moe_sudo[@]}" apt-get install -y -qq --no-install-recommends "${moe_missing[@]}"
fi

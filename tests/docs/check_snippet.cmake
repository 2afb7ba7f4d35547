# Fails when README.md does not contain the text of the snippet file verbatim (it must be the code the
# test compiles and runs).
file(READ "${README}" readme)
file(READ "${SNIPPET}" snippet)
string(FIND "${readme}" "${snippet}" pos)
if(pos EQUAL -1)
  message(FATAL_ERROR "README.md does not contain ${SNIPPET} verbatim: update the README's usage snippet")
endif()

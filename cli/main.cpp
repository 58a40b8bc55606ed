// tensorreg — command-line client (placeholder until the commands land).
#include <cstdio>
int main() { std::fputs("usage: tensorreg <command> ...\n", stderr); return 2; }

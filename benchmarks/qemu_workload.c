/* compiler-like integer work: hash-table inserts, string compares and sorting */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
static int cmp(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }
int main(void) {
    enum { N = 600000, B = 1 << 20 };
    char **s = malloc(N * sizeof *s); unsigned *tab = calloc(B, sizeof *tab); unsigned long h, acc = 0;
    for (int i = 0; i < N; i++) { s[i] = malloc(24); snprintf(s[i], 24, "sym_%x_%d", (unsigned)(i * 2654435761u), i % 977); }
    for (int r = 0; r < 4; r++) for (int i = 0; i < N; i++) { h = 5381; for (char *p = s[i]; *p; p++) h = h * 33 + *p; tab[h & (B - 1)] += r; }
    qsort(s, N, sizeof *s, cmp);
    for (int i = 0; i < B; i++) acc += tab[i];
    printf("%lu %s\n", acc, s[N / 2]);
    return 0;
}
